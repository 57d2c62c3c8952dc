// Anyres and Qwen2-VL tiling (see tiling.h). The size arithmetic mirrors transformers'
// select_best_resolution, get_patch_output_size, _get_padding_size and Qwen2-VL's smart_resize.
#include "tiling.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "normalize.h"
#include "resample.h"

namespace vlm2vec {

namespace {

constexpr size_t kStreamBytes = size_t(4) << 20;

// Python's round() on a float: half to even.
double round_half_even(double x) {
    const double r = std::floor(x);
    const double d = x - r;
    if (d > 0.5) return r + 1.0;
    if (d < 0.5) return r;
    return std::fmod(r, 2.0) == 0.0 ? r : r + 1.0;
}

// One crop x crop view, channels first, cut at (y0, x0) from a canvas in which `image` sits at
// (top, left) and everything else is black (pixel value 0, which the table maps to -mean/std).
template <class T>
void emit_view(const RgbView& image, int top, int left, int y0, int x0, int crop, const T* lut, T* out,
               bool stream) {
    const size_t plane = static_cast<size_t>(crop) * crop;
    const T* l[3] = {lut, lut + 256, lut + 512};
    // Columns [a, b) of the view come from the image.
    const int a = std::clamp(left - x0, 0, crop);
    const int b = std::clamp(left + image.width - x0, 0, crop);
    for (int y = 0; y < crop; ++y) {
        T* d[3] = {out + static_cast<size_t>(y) * crop, out + plane + static_cast<size_t>(y) * crop,
                   out + 2 * plane + static_cast<size_t>(y) * crop};
        const int iy = y0 + y - top;
        if (iy < 0 || iy >= image.height || a >= b) {
            for (int c = 0; c < 3; ++c) std::fill_n(d[c], crop, l[c][0]);
            continue;
        }
        for (int c = 0; c < 3; ++c) {
            std::fill_n(d[c], a, l[c][0]);
            std::fill_n(d[c] + b, crop - b, l[c][0]);
        }
        const uint8_t* src = image.row(iy) + static_cast<ptrdiff_t>(x0 + a - left) * 3;
        lut_to_planes(src, b - a, lut, d[0] + a, d[1] + a, d[2] + a, stream);
    }
}

// The image at (h, w): itself when it already has that size, else a Pillow-exact resize in `buf`.
RgbView resized(const RgbView& image, int h, int w, Buffer& buf, Scratch& scratch) {
    if (h == image.height && w == image.width) return image;
    const ptrdiff_t stride = static_cast<ptrdiff_t>(w) * 3;
    uint8_t* dst = buf.get(static_cast<size_t>(h) * stride);
    resize_bicubic(image, h, w, dst, stride, scratch);
    return RgbView{dst, stride, h, w};
}

}  // namespace

AnyresPlan plan_anyres(int height, int width, const std::vector<Pinpoint>& pinpoints, int crop) {
    if (height <= 0 || width <= 0) throw std::invalid_argument("image sides must be positive");
    if (crop <= 0) throw std::invalid_argument("crop_size must be positive");
    if (pinpoints.empty()) throw std::invalid_argument("grid_pinpoints is empty");
    // select_best_resolution: most effective pixels, then least waste; first wins ties.
    int64_t best_effective = 0, least_waste = LLONG_MAX;
    const Pinpoint* best = nullptr;
    const double oh = height, ow = width;
    for (const Pinpoint& p : pinpoints) {
        const int h = p.first, w = p.second;
        if (h <= 0 || w <= 0 || h % crop || w % crop)
            throw std::invalid_argument("grid pinpoints must be positive multiples of crop_size");
        const double scale = std::min(w / ow, h / oh);
        const int64_t dw = static_cast<int64_t>(ow * scale), dh = static_cast<int64_t>(oh * scale);
        const int64_t effective = std::min(dw * dh, static_cast<int64_t>(height) * width);
        const int64_t waste = static_cast<int64_t>(h) * w - effective;
        if (effective > best_effective || (effective == best_effective && waste < least_waste)) {
            best_effective = effective;
            least_waste = waste;
            best = &p;
        }
    }
    AnyresPlan plan;
    plan.best_h = best->first;
    plan.best_w = best->second;
    // get_patch_output_size
    const double scale_w = plan.best_w / ow, scale_h = plan.best_h / oh;
    if (scale_w < scale_h) {
        plan.resized_w = plan.best_w;
        plan.resized_h = static_cast<int>(std::min(std::ceil(oh * scale_w), static_cast<double>(plan.best_h)));
    } else {
        plan.resized_h = plan.best_h;
        plan.resized_w = static_cast<int>(std::min(std::ceil(ow * scale_h), static_cast<double>(plan.best_w)));
    }
    plan.pad_top = (plan.best_h - plan.resized_h) / 2;
    plan.pad_left = (plan.best_w - plan.resized_w) / 2;
    plan.rows = plan.best_h / crop;
    plan.cols = plan.best_w / crop;
    return plan;
}

Qwen2VLPlan plan_qwen2vl(int height, int width, int patch, int merge, int64_t min_pixels, int64_t max_pixels) {
    if (height <= 0 || width <= 0) throw std::invalid_argument("image sides must be positive");
    if (patch <= 0 || merge <= 0 || min_pixels <= 0 || max_pixels <= 0)
        throw std::invalid_argument("patch_size, merge_size, min_pixels and max_pixels must be positive");
    const double ratio = static_cast<double>(std::max(height, width)) / std::min(height, width);
    if (ratio > 200)
        throw std::invalid_argument("absolute aspect ratio must be smaller than 200, got " + std::to_string(ratio));
    const int64_t factor = static_cast<int64_t>(patch) * merge;
    const double f = static_cast<double>(factor);
    int64_t h_bar = static_cast<int64_t>(round_half_even(height / f)) * factor;
    int64_t w_bar = static_cast<int64_t>(round_half_even(width / f)) * factor;
    const double pixels = static_cast<double>(static_cast<int64_t>(height) * width);
    if (h_bar * w_bar > max_pixels) {
        const double beta = std::sqrt(pixels / static_cast<double>(max_pixels));
        h_bar = std::max(factor, static_cast<int64_t>(std::floor(height / beta / f)) * factor);
        w_bar = std::max(factor, static_cast<int64_t>(std::floor(width / beta / f)) * factor);
    } else if (h_bar * w_bar < min_pixels) {
        const double beta = std::sqrt(static_cast<double>(min_pixels) / pixels);
        h_bar = static_cast<int64_t>(std::ceil(height * beta / f)) * factor;
        w_bar = static_cast<int64_t>(std::ceil(width * beta / f)) * factor;
    }
    if (h_bar > (1 << 20) || w_bar > (1 << 20) || h_bar * w_bar > (int64_t(1) << 26))
        throw std::invalid_argument("the resized image would be " + std::to_string(w_bar) + "x" +
                                    std::to_string(h_bar) + " pixels (check min_pixels)");
    Qwen2VLPlan plan;
    plan.resized_h = static_cast<int>(h_bar);
    plan.resized_w = static_cast<int>(w_bar);
    plan.grid_h = plan.resized_h / patch;
    plan.grid_w = plan.resized_w / patch;
    return plan;
}

RgbView packed_view(const StridedImage& im, Scratch& scratch) {
    if (im.pixel_stride == 3 && im.channel_stride == 1) return RgbView{im.data, im.row_stride, im.height, im.width};
    const ptrdiff_t stride = static_cast<ptrdiff_t>(im.width) * 3;
    uint8_t* dst = scratch.packed.get(static_cast<size_t>(im.height) * stride);
    for (int y = 0; y < im.height; ++y) {
        const uint8_t* row = im.data + y * im.row_stride;
        uint8_t* out = dst + y * stride;
        for (int x = 0; x < im.width; ++x)
            for (int c = 0; c < 3; ++c) out[3 * x + c] = row[x * im.pixel_stride + c * im.channel_stride];
    }
    return RgbView{dst, stride, im.height, im.width};
}

template <class T>
void run_anyres(const RgbView& image, const AnyresPlan& plan, int crop, const T* lut, T* out, Scratch& scratch) {
    const size_t view = 3 * static_cast<size_t>(crop) * crop;
    // Outputs far larger than the caches are written around them (no read-for-ownership of the lines).
    const bool stream = view * plan.views() * sizeof(T) >= kStreamBytes;
    // Base view: the whole image squashed to crop x crop.
    emit_view(resized(image, crop, crop, scratch.resized, scratch), 0, 0, 0, 0, crop, lut, out, stream);
    // Grid views, row-major, from the aspect-keeping resize centred in the best resolution.
    const RgbView grid = resized(image, plan.resized_h, plan.resized_w, scratch.resized, scratch);
    for (int r = 0; r < plan.rows; ++r)
        for (int c = 0; c < plan.cols; ++c)
            emit_view(grid, plan.pad_top, plan.pad_left, r * crop, c * crop, crop, lut,
                      out + (1 + static_cast<size_t>(r) * plan.cols + c) * view, stream);
    if (stream) store_fence();
}

template <class T>
void run_qwen2vl(const RgbView& image, const Qwen2VLPlan& plan, int patch, int merge, int temporal, const T* lut,
                 T* out, Scratch& scratch) {
    const RgbView img = resized(image, plan.resized_h, plan.resized_w, scratch.resized, scratch);
    const size_t block = static_cast<size_t>(patch) * patch;  // one channel of one patch
    const size_t row_len = 3 * static_cast<size_t>(temporal) * block;
    const int blocks_h = plan.grid_h / merge, blocks_w = plan.grid_w / merge;
    size_t r = 0;
    for (int bh = 0; bh < blocks_h; ++bh)
        for (int bw = 0; bw < blocks_w; ++bw)
            for (int mh = 0; mh < merge; ++mh)
                for (int mw = 0; mw < merge; ++mw, ++r) {
                    T* o = out + r * row_len;
                    const int y0 = (bh * merge + mh) * patch, x0 = (bw * merge + mw) * patch;
                    for (int c = 0; c < 3; ++c) {
                        T* blk = o + static_cast<size_t>(c) * temporal * block;
                        const T* l = lut + 256 * c;
                        for (int py = 0; py < patch; ++py)
                            lut_channel(img.row(y0 + py) + static_cast<ptrdiff_t>(x0) * 3 + c, patch, l,
                                        blk + static_cast<size_t>(py) * patch);
                        // A still image is its own temporal neighbour: the frame repeats.
                        for (int t = 1; t < temporal; ++t) std::copy_n(blk, block, blk + t * block);
                    }
                }
}

template void run_anyres<float>(const RgbView&, const AnyresPlan&, int, const float*, float*, Scratch&);
template void run_anyres<uint16_t>(const RgbView&, const AnyresPlan&, int, const uint16_t*, uint16_t*, Scratch&);
template void run_qwen2vl<float>(const RgbView&, const Qwen2VLPlan&, int, int, int, const float*, float*,
                                 Scratch&);
template void run_qwen2vl<uint16_t>(const RgbView&, const Qwen2VLPlan&, int, int, int, const uint16_t*,
                                    uint16_t*, Scratch&);

namespace {

// Working memory outlives a call: freshly allocated multi-megabyte buffers would page-fault (and be
// zeroed by the kernel) on every image. A few are kept; a huge one (from a huge image) is let go.
class ScratchPool {
  public:
    std::unique_ptr<Scratch> take() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (free_.empty()) return std::make_unique<Scratch>();
        std::unique_ptr<Scratch> s = std::move(free_.back());
        free_.pop_back();
        return s;
    }
    void give(std::unique_ptr<Scratch> s) {
        if (s->bytes() > kMaxBytes) return;
        std::lock_guard<std::mutex> lock(mutex_);
        if (free_.size() < kMaxKept) free_.push_back(std::move(s));
    }

  private:
    static constexpr size_t kMaxBytes = size_t(96) << 20;
    static constexpr size_t kMaxKept = 16;
    std::mutex mutex_;
    std::vector<std::unique_ptr<Scratch>> free_;
};

ScratchPool& scratch_pool() {
    static ScratchPool* pool = new ScratchPool();  // never destroyed: worker threads may outlive statics
    return *pool;
}

}  // namespace

void parallel_for(int n, int threads, const std::function<void(int, Scratch&)>& fn) {
    threads = std::max(1, std::min(threads, n));
    std::atomic<int> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&]() {
        std::unique_ptr<Scratch> scratch;
        try {
            scratch = scratch_pool().take();
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (!error) error = std::current_exception();
            return;
        }
        for (int i; (i = next.fetch_add(1)) < n;) {
            try {
                fn(i, *scratch);
            } catch (...) {
                std::lock_guard<std::mutex> lock(error_mutex);
                if (!error) error = std::current_exception();
            }
        }
        scratch_pool().give(std::move(scratch));
    };
    std::vector<std::thread> pool;
    try {
        for (int t = 1; t < threads; ++t) pool.emplace_back(work);
    } catch (const std::system_error&) {
        // Fewer threads than asked (the system refused one): the ones we have finish the work.
    }
    work();
    for (std::thread& t : pool) t.join();
    if (error) std::rethrow_exception(error);
}

}  // namespace vlm2vec
