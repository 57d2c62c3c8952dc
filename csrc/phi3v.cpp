// Phi-3.5-V preprocessing (see phi3v.h), step by step as the official image_processing_phi3_v.py does it:
//
//   HD_transform   transpose when width < height; scale = the largest s with s * ceil(s / ratio) <= num_crops;
//                  resize to (s * 336) x int(s * 336 / ratio) with torchvision's resize on a PIL image, which
//                  is Image.resize(size, BILINEAR); padding_336: white rows above and below, to a multiple
//                  of 336 (top = half the padding, rounded down); transpose back.
//   ToTensor + Normalize: ((x / 255) - mean) / std in float32, one table lookup per channel value.
//   global view    torch.nn.functional.interpolate(hd, size=(336, 336), mode="bicubic") on the normalised
//                  image (a = -0.75, align_corners=False, no antialiasing, edge indices clamped).
//   crops          the HD image cut into 336x336 crops, row-major, after the global view; then zero views
//                  up to num_crops + 1 (pad_to_max_num_crops_tensor).
//
// The bilinear resize is Pillow's bit for bit: resample.h's passes (the ones the bicubic resize runs) with
// the triangle filter's taps. Pillow picks which pass runs first from the sizes, and the intermediate
// rounding depends on it, so the choice is made as Pillow makes it on the transposed image the official code
// resizes. The transposes themselves are never done: a transposed image's rows are this image's columns.
#include "phi3v.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "normalize.h"
#include "resample.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VLM2VEC_X86 1
#endif

namespace vlm2vec {

namespace {

constexpr int kCrop = kPhi3VCrop;
constexpr size_t kPlane = static_cast<size_t>(kCrop) * kCrop;
constexpr size_t kView = 3 * kPlane;
constexpr size_t kStreamBytes = size_t(4) << 20;  // outputs this large are written around the caches

// ---- Pillow's bilinear resize -------------------------------------------------------------------------

// The image resized to out_h x out_w (this image's orientation) as the official code resizes it: Pillow's
// Image.resize(BILINEAR) of the transposed image when `transposed`, then transposed back. Unchanged sizes:
// the image itself (torchvision's resize returns it as is).
RgbView resize_bilinear(const RgbView& src, int out_h, int out_w, bool transposed, Scratch& scratch) {
    const bool need_x = out_w != src.width, need_y = out_h != src.height;
    if (!need_x && !need_y) return src;
    const ptrdiff_t out_stride = static_cast<ptrdiff_t>(out_w) * 3;
    uint8_t* dst = scratch.resized.get(static_cast<size_t>(out_h) * out_stride);
    // Pillow's pass order, decided in its own frame: the image it resizes is the transpose of this one when
    // `transposed`, and its horizontal pass is then this image's vertical one. (HD_transform keeps the aspect
    // ratio of an image at least as wide as high, so its sizes never ask for vertical first with both passes;
    // the rule is kept whole so this stays Pillow's resize for any sizes.) A pass's sums do not depend on the
    // axis it runs along, so the passes run untransposed.
    const bool pil_horizontal_first = transposed ? pillow_horizontal_first(src.width, src.height, out_w, out_h)
                                                 : pillow_horizontal_first(src.height, src.width, out_h, out_w);
    const bool x_first = pil_horizontal_first != transposed;
    Taps tx, ty;
    if (need_x) tx = filter_taps(Filter::bilinear, src.width, out_w);
    if (need_y) ty = filter_taps(Filter::bilinear, src.height, out_h);
    resample(src, need_x ? &tx : nullptr, need_y ? &ty : nullptr, x_first, dst, out_stride, scratch);
    return RgbView{dst, out_stride, out_h, out_w};
}

// ---- the normalised HD canvas: crops, and the global view's input --------------------------------------

// Row r of the normalised HD canvas as three planes of plan.hd_w floats.
void canvas_row(const RgbView& image, const Phi3VPlan& plan, int r, const float* lut, float* d) {
    const int w = plan.hd_w;
    float* planes[3] = {d, d + w, d + 2 * static_cast<size_t>(w)};
    const int iy = r - plan.pad_top;
    if (iy < 0 || iy >= image.height) {
        for (int c = 0; c < 3; ++c) std::fill_n(planes[c], w, lut[256 * c + 255]);
        return;
    }
    const int left = plan.pad_left, right = left + image.width;
    for (int c = 0; c < 3; ++c) {
        std::fill_n(planes[c], left, lut[256 * c + 255]);
        std::fill_n(planes[c] + right, w - right, lut[256 * c + 255]);
    }
    lut_to_planes(image.row(iy), image.width, lut, planes[0] + left, planes[1] + left, planes[2] + left, false);
}

#ifdef VLM2VEC_X86
// n floats with non-temporal stores (64-byte aligned ones; the head before the first aligned address and the
// tail are plain stores).
__attribute__((target("avx512f"))) void stream_copy_avx512(const float* src, size_t n, float* dst) {
    size_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63); ++i) dst[i] = src[i];
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
}
#endif

// The canvas produced one row at a time, top to bottom, each row normalised once and used twice: copied into
// the crops it belongs to (written around the caches when `stream`), and kept in a ring of kSlots rows for
// the global view's y taps. The taps only move down (4 consecutive rows per output, nondecreasing with the
// output), so a row asked for is at most 3 behind the last one produced, well inside the ring.
class Canvas {
  public:
    static constexpr int kSlots = 8;

    Canvas(const RgbView& image, const Phi3VPlan& plan, const float* lut, float* crops, bool stream, float* ring)
        : image_(image), plan_(plan), lut_(lut), crops_(crops), ring_(ring), stream_(stream) {}

    static size_t ring_floats(const Phi3VPlan& plan) { return kSlots * row_floats(plan); }

    // Row r (three planes of hd_w floats), producing the rows up to it first.
    const float* row(int r) {
        while (next_ <= r) produce(next_++);
        return slot(r);
    }

    // The rows no global view tap reached (below its last one, or between taps when it shrinks more than 4x
    // in height) still go into the crops.
    void finish() {
        while (next_ < plan_.hd_h) produce(next_++);
    }

  private:
    static size_t row_floats(const Phi3VPlan& plan) { return 3 * static_cast<size_t>(plan.hd_w); }
    float* slot(int r) { return ring_ + static_cast<size_t>(r % kSlots) * row_floats(plan_); }

    void produce(int r) {
        float* d = slot(r);
        canvas_row(image_, plan_, r, lut_, d);
        // Row r % 336 of every crop in crop row r / 336: crop (R, C) is view 1 + R * cols + C of the output.
        const int y = r % kCrop;
        float* view = crops_ + static_cast<size_t>(r / kCrop) * plan_.cols * kView;
        for (int c = 0; c < plan_.cols; ++c, view += kView)
            for (int ch = 0; ch < 3; ++ch)
                copy(d + static_cast<size_t>(ch) * plan_.hd_w + static_cast<size_t>(c) * kCrop,
                     view + ch * kPlane + static_cast<size_t>(y) * kCrop);
    }

    void copy(const float* src, float* dst) const {
#ifdef VLM2VEC_X86
        if (stream_ && active_isa() == Isa::avx512) return stream_copy_avx512(src, kCrop, dst);
#endif
        std::memcpy(dst, src, kCrop * sizeof(float));
    }

    const RgbView& image_;
    const Phi3VPlan& plan_;
    const float* lut_;
    float* crops_;
    float* ring_;
    bool stream_;
    int next_ = 0;  // the next row to produce
};

// ---- global view: torch's bicubic interpolate ----------------------------------------------------------

// Four taps per output: input indices (clamped to the edges) and float weights, tap-major (tap j of output i
// at [j * out + i]) so that the SIMD kernels load the same tap of consecutive outputs as one vector.
struct CubicTaps {
    int out = 0;
    std::vector<int32_t> index;  // [4 * out]
    std::vector<float> weight;   // [4 * out]
};

inline float cubic_near(float x, float a) { return ((a + 2) * x - (a + 3)) * x * x + 1; }        // |x| <= 1
inline float cubic_far(float x, float a) { return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a; }  // 1 < |x| < 2

// HelperInterpCubic::compute_indices_weights for float input, align_corners=False and an output size (no
// scale factor): area_pixel_compute_scale, area_pixel_compute_source_index (cubic: not clamped at 0),
// guard_index_and_lambda and get_cubic_upsample_coefficients (a = -0.75), all in float as torch does.
CubicTaps torch_bicubic_taps(int in_size, int out_size) {
    CubicTaps t;
    t.out = out_size;
    t.index.resize(static_cast<size_t>(out_size) * 4);
    t.weight.resize(static_cast<size_t>(out_size) * 4);
    const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
    const float a = -0.75f;
    for (int i = 0; i < out_size; ++i) {
        const float real = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
        const int64_t index = std::min(static_cast<int64_t>(std::floor(real)), static_cast<int64_t>(in_size) - 1);
        const float lambda = std::min(std::max(real - static_cast<float>(index), 0.0f), 1.0f);
        const float x2 = 1.0f - lambda;
        const float w[4] = {cubic_far(lambda + 1.0f, a), cubic_near(lambda, a), cubic_near(x2, a),
                            cubic_far(x2 + 1.0f, a)};
        for (int j = 0; j < 4; ++j) {
            const int64_t k = std::clamp<int64_t>(index - 1 + j, 0, in_size - 1);
            t.index[static_cast<size_t>(j) * out_size + i] = static_cast<int32_t>(k);
            t.weight[static_cast<size_t>(j) * out_size + i] = w[j];
        }
    }
    return t;
}

// The two steps of the global view below, for one output row. Every output is computed with the same float
// operations in the same order on every instruction set (v = a * w0, v += b * w1, ...; no fused multiply-add,
// see setup.py), so the SIMD kernels give the scalar code's bits.
//
// mix_y: mixed[k] = sum_j rows[j][k] * w[j] over n floats (whole canvas rows, contiguous).
// mix_x: out[x] = sum_j m[index[j][x]] * weight[j][x] for the tx.out outputs of one channel.
void mix_y_scalar(const float* const rows[4], const float w[4], size_t n, float* mixed) {
    for (size_t k = 0; k < n; ++k) {
        float v = rows[0][k] * w[0];
        v += rows[1][k] * w[1];
        v += rows[2][k] * w[2];
        v += rows[3][k] * w[3];
        mixed[k] = v;
    }
}

void mix_x_scalar(const float* m, const CubicTaps& tx, int x0, float* out) {
    const size_t n = tx.out;
    const int32_t* ix = tx.index.data();
    const float* wx = tx.weight.data();
    for (size_t x = x0; x < n; ++x) {
        float v = m[ix[x]] * wx[x];
        v += m[ix[n + x]] * wx[n + x];
        v += m[ix[2 * n + x]] * wx[2 * n + x];
        v += m[ix[3 * n + x]] * wx[3 * n + x];
        out[x] = v;
    }
}

#ifdef VLM2VEC_X86
__attribute__((target("avx2"))) void mix_y_avx2(const float* const rows[4], const float w[4], size_t n,
                                                float* mixed) {
    const __m256 w0 = _mm256_set1_ps(w[0]), w1 = _mm256_set1_ps(w[1]), w2 = _mm256_set1_ps(w[2]),
                 w3 = _mm256_set1_ps(w[3]);
    size_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(rows[0] + k), w0);
        v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_loadu_ps(rows[1] + k), w1));
        v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_loadu_ps(rows[2] + k), w2));
        v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_loadu_ps(rows[3] + k), w3));
        _mm256_storeu_ps(mixed + k, v);
    }
    const float* tail[4] = {rows[0] + k, rows[1] + k, rows[2] + k, rows[3] + k};
    mix_y_scalar(tail, w, n - k, mixed + k);
}

// The x taps are gathers: an output's 4 inputs are neighbours, but consecutive outputs are `scale` apart.
__attribute__((target("avx2"))) void mix_x_avx2(const float* m, const CubicTaps& tx, float* out) {
    const size_t n = tx.out;
    const int32_t* ix = tx.index.data();
    const float* wx = tx.weight.data();
    size_t x = 0;
    for (; x + 8 <= n; x += 8) {
        __m256 v = _mm256_i32gather_ps(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ix + x)), 4);
        v = _mm256_mul_ps(v, _mm256_loadu_ps(wx + x));
        for (size_t j = 1; j < 4; ++j) {
            const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ix + j * n + x));
            v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_i32gather_ps(m, idx, 4), _mm256_loadu_ps(wx + j * n + x)));
        }
        _mm256_storeu_ps(out + x, v);
    }
    mix_x_scalar(m, tx, static_cast<int>(x), out);
}

__attribute__((target("avx512f"))) void mix_y_avx512(const float* const rows[4], const float w[4], size_t n,
                                                     float* mixed) {
    const __m512 w0 = _mm512_set1_ps(w[0]), w1 = _mm512_set1_ps(w[1]), w2 = _mm512_set1_ps(w[2]),
                 w3 = _mm512_set1_ps(w[3]);
    size_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(rows[0] + k), w0);
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_loadu_ps(rows[1] + k), w1));
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_loadu_ps(rows[2] + k), w2));
        v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_loadu_ps(rows[3] + k), w3));
        _mm512_storeu_ps(mixed + k, v);
    }
    const float* tail[4] = {rows[0] + k, rows[1] + k, rows[2] + k, rows[3] + k};
    mix_y_scalar(tail, w, n - k, mixed + k);
}

__attribute__((target("avx512f"))) void mix_x_avx512(const float* m, const CubicTaps& tx, float* out) {
    const size_t n = tx.out;
    const int32_t* ix = tx.index.data();
    const float* wx = tx.weight.data();
    size_t x = 0;
    for (; x + 16 <= n; x += 16) {
        __m512 v = _mm512_i32gather_ps(_mm512_loadu_si512(ix + x), m, 4);
        v = _mm512_mul_ps(v, _mm512_loadu_ps(wx + x));
        for (size_t j = 1; j < 4; ++j) {
            const __m512 g = _mm512_i32gather_ps(_mm512_loadu_si512(ix + j * n + x), m, 4);
            v = _mm512_add_ps(v, _mm512_mul_ps(g, _mm512_loadu_ps(wx + j * n + x)));
        }
        _mm512_storeu_ps(out + x, v);
    }
    mix_x_scalar(m, tx, static_cast<int>(x), out);
}
#endif

void mix_y(const float* const rows[4], const float w[4], size_t n, float* mixed) {
#ifdef VLM2VEC_X86
    const Isa isa = active_isa();
    if (isa == Isa::avx512) return mix_y_avx512(rows, w, n, mixed);
    if (isa == Isa::avx2) return mix_y_avx2(rows, w, n, mixed);
#endif
    mix_y_scalar(rows, w, n, mixed);
}

void mix_x(const float* m, const CubicTaps& tx, float* out) {
#ifdef VLM2VEC_X86
    const Isa isa = active_isa();
    if (isa == Isa::avx512) return mix_x_avx512(m, tx, out);
    if (isa == Isa::avx2) return mix_x_avx2(m, tx, out);
#endif
    mix_x_scalar(m, tx, 0, out);
}

// out: [3, 336, 336]. torch sums each output as sum_y wy * (sum_x wx * v); here the y taps are applied first
// (whole rows at a time, which vectorises), then the x taps: the same products, summed in another order, so
// results differ from torch's by float rounding only (a few ulp).
void global_view(Canvas& canvas, const Phi3VPlan& plan, float* out, float* mixed) {
    const CubicTaps ty = torch_bicubic_taps(plan.hd_h, kCrop);
    const CubicTaps tx = torch_bicubic_taps(plan.hd_w, kCrop);
    for (int i = 0; i < kCrop; ++i) {
        const float* rows[4];
        float wy[4];
        for (int j = 0; j < 4; ++j) {
            rows[j] = canvas.row(ty.index[static_cast<size_t>(j) * kCrop + i]);
            wy[j] = ty.weight[static_cast<size_t>(j) * kCrop + i];
        }
        mix_y(rows, wy, 3 * static_cast<size_t>(plan.hd_w), mixed);
        for (int c = 0; c < 3; ++c)
            mix_x(mixed + static_cast<size_t>(c) * plan.hd_w, tx, out + c * kPlane + static_cast<size_t>(i) * kCrop);
    }
}

}  // namespace

Phi3VPlan plan_phi3v(int height, int width, int num_crops) {
    if (height <= 0 || width <= 0) throw std::invalid_argument("image sides must be positive");
    if (num_crops < 1 || num_crops > kPhi3VMaxCrops)
        throw std::invalid_argument("num_crops must be in [1, " + std::to_string(kPhi3VMaxCrops) + "]");
    Phi3VPlan plan;
    plan.num_crops = num_crops;
    plan.transposed = width < height;
    // In the transposed frame the official code works in: width >= height.
    const int tw = plan.transposed ? height : width, th = plan.transposed ? width : height;
    const double ratio = static_cast<double>(tw) / th;
    int scale = 1;
    while (scale * std::ceil(scale / ratio) <= num_crops) ++scale;
    --scale;
    const int new_w = scale * kCrop;
    const int new_h = static_cast<int>(new_w / ratio);
    if (new_h < 1)
        throw std::invalid_argument("aspect ratio " + std::to_string(ratio) + " is too extreme: the HD transform "
                                    "would resize the short side to 0 pixels (the official processor fails too)");
    const int target = (new_h + kCrop - 1) / kCrop * kCrop;
    const int pad = (target - new_h) / 2;
    if (plan.transposed) {
        plan.resized_h = new_w;
        plan.resized_w = new_h;
        plan.pad_left = pad;
        plan.hd_h = new_w;
        plan.hd_w = target;
    } else {
        plan.resized_h = new_h;
        plan.resized_w = new_w;
        plan.pad_top = pad;
        plan.hd_h = target;
        plan.hd_w = new_w;
    }
    plan.rows = plan.hd_h / kCrop;
    plan.cols = plan.hd_w / kCrop;
    // scale * ceil(scale / ratio) <= num_crops bounds the grid; kept as a check, the output has no room for more.
    if (plan.crops() > num_crops) throw std::invalid_argument("the HD grid has more crops than num_crops");
    return plan;
}

void run_phi3v(const RgbView& image, const Phi3VPlan& plan, const float* lut, float* out, Scratch& scratch) {
    const bool stream = kView * (plan.num_crops + 1) * sizeof(float) >= kStreamBytes;
    const RgbView hd = resize_bilinear(image, plan.resized_h, plan.resized_w, plan.transposed, scratch);
    // The canvas ring, then the global view's y-mixed row (three planes of hd_w floats).
    const size_t ring = Canvas::ring_floats(plan), mixed = 3 * static_cast<size_t>(plan.hd_w);
    float* work = reinterpret_cast<float*>(scratch.temp2.get((ring + mixed) * sizeof(float)));
    Canvas canvas(hd, plan, lut, out + kView, stream, work);
    global_view(canvas, plan, out, work + ring);
    canvas.finish();
    const size_t used = 1 + static_cast<size_t>(plan.crops());
    std::memset(out + used * kView, 0, (static_cast<size_t>(plan.num_crops) + 1 - used) * kView * sizeof(float));
    if (stream) store_fence();
}

}  // namespace vlm2vec
