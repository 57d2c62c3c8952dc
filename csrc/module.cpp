// vlm2vec_rt._C: the native core. Only what must be native lives here (image tiling).
//
// Called through vlm2vec_rt.preprocess.tiling, which validates arguments with clear messages first;
// every check is repeated here (std::invalid_argument -> ValueError) so no input reaches the kernels
// unchecked. Outputs are allocated with the GIL held; the work runs with it released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "phi3v.h"
#include "pool.h"
#include "resample.h"
#include "tiling.h"

namespace py = pybind11;
using namespace vlm2vec;

namespace {

// Hard limits, above anything the Python face lets through.
constexpr int64_t kMaxSide = int64_t(1) << 20;
constexpr int64_t kMaxPixels = int64_t(1) << 28;
constexpr int64_t kMaxOutputBytes = int64_t(1) << 32;

StridedImage check_image(const py::handle& obj, const std::string& what) {
    if (!py::isinstance<py::array>(obj)) throw std::invalid_argument(what + ": expected a numpy array");
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (a.dtype().kind() != 'u' || a.itemsize() != 1)
        throw std::invalid_argument(what + ": expected dtype uint8");
    if (a.ndim() != 3 || a.shape(2) != 3) throw std::invalid_argument(what + ": expected shape (H, W, 3)");
    const int64_t h = a.shape(0), w = a.shape(1);
    if (h < 1 || w < 1) throw std::invalid_argument(what + ": empty image");
    if (h > kMaxSide || w > kMaxSide || h * w > kMaxPixels) throw std::invalid_argument(what + ": image too large");
    StridedImage im;
    im.data = static_cast<const uint8_t*>(a.data());
    im.row_stride = a.strides(0);
    im.pixel_stride = a.strides(1);
    im.channel_stride = a.strides(2);
    im.height = static_cast<int>(h);
    im.width = static_cast<int>(w);
    return im;
}

// The [3, 256] table of output values; its dtype is the output dtype.
struct Lut {
    const void* data;
    bool half;
};

Lut check_lut(const py::array& lut) {
    const char kind = lut.dtype().kind();
    const bool half = kind == 'f' && lut.itemsize() == 2;
    if (!(kind == 'f' && (lut.itemsize() == 4 || half)))
        throw std::invalid_argument("lut: expected dtype float32 or float16");
    if (lut.ndim() != 2 || lut.shape(0) != 3 || lut.shape(1) != 256 ||
        !(lut.flags() & py::array::c_style))
        throw std::invalid_argument("lut: expected a C-contiguous (3, 256) array");
    return Lut{lut.data(), half};
}

// A new output array; large ones take their memory from the BufferPool and give it back when freed.
py::array new_output(bool half, const std::vector<py::ssize_t>& shape) {
    int64_t bytes = half ? 2 : 4;
    for (py::ssize_t s : shape) bytes *= s;
    if (bytes > kMaxOutputBytes) throw std::invalid_argument("output would exceed 4 GiB");
    const py::dtype dtype(half ? "float16" : "float32");
    if (static_cast<size_t>(bytes) < BufferPool::kMinBytes) return py::array(dtype, shape);
    struct Block {
        void* data;
        size_t capacity;
    };
    auto* block = new Block{nullptr, 0};
    try {
        block->data = BufferPool::instance().acquire(static_cast<size_t>(bytes), &block->capacity);
    } catch (...) {
        delete block;
        throw;
    }
    py::capsule owner(block, [](void* b) {
        auto* blk = static_cast<Block*>(b);
        BufferPool::instance().release(blk->data, blk->capacity);
        delete blk;
    });
    return py::array(dtype, shape, block->data, owner);
}

void check_anyres_args(const std::vector<Pinpoint>& pinpoints, int crop, int square) {
    if (crop < 1 || crop > 4096) throw std::invalid_argument("crop_size must be in [1, 4096]");
    if (square < 0 || square > 16384) throw std::invalid_argument("resize_to must be in [1, 16384]");
    if (pinpoints.empty()) throw std::invalid_argument("grid_pinpoints is empty");
    for (const Pinpoint& p : pinpoints) {
        if (p.first < crop || p.second < crop || p.first % crop || p.second % crop)
            throw std::invalid_argument("grid pinpoints must be positive multiples of crop_size");
        const int64_t views = 1 + int64_t(p.first / crop) * (p.second / crop);
        if (views > 4096 || views * 3 * crop * crop * 4 > kMaxOutputBytes)
            throw std::invalid_argument("a grid pinpoint gives absurdly many views");
    }
}

struct AnyresJob {
    StridedImage image;
    int square;  // VLM2Vec "high" resolution: resized to square x square first (0: not)
    AnyresPlan plan;
    void* out;
};

AnyresJob prepare_anyres(const py::handle& image, const std::string& what, const std::vector<Pinpoint>& pinpoints,
                         int crop, int square, const Lut& lut, py::array& out) {
    AnyresJob job;
    job.image = check_image(image, what);
    job.square = square;
    const int h = square ? square : job.image.height, w = square ? square : job.image.width;
    job.plan = plan_anyres(h, w, pinpoints, crop);
    out = new_output(lut.half, {job.plan.views(), 3, crop, crop});
    job.out = out.mutable_data();
    return job;
}

void run_anyres_job(const AnyresJob& job, int crop, const Lut& lut, Scratch& scratch) {
    RgbView view = packed_view(job.image, scratch);
    if (job.square && (view.height != job.square || view.width != job.square)) {
        const ptrdiff_t stride = static_cast<ptrdiff_t>(job.square) * 3;
        uint8_t* dst = scratch.square.get(static_cast<size_t>(job.square) * stride);
        resize_bicubic(view, job.square, job.square, dst, stride, scratch);
        view = RgbView{dst, stride, job.square, job.square};
    }
    if (lut.half)
        run_anyres(view, job.plan, crop, static_cast<const uint16_t*>(lut.data), static_cast<uint16_t*>(job.out),
                   scratch);
    else
        run_anyres(view, job.plan, crop, static_cast<const float*>(lut.data), static_cast<float*>(job.out), scratch);
}

struct QwenArgs {
    int patch, merge, temporal;
    int64_t min_pixels, max_pixels;
};

struct QwenJob {
    StridedImage image;
    Qwen2VLPlan plan;
    void* out;
};

QwenJob prepare_qwen(const py::handle& image, const std::string& what, const QwenArgs& q, const Lut& lut,
                     py::array& out) {
    if (q.patch < 1 || q.patch > 1024 || q.merge < 1 || q.merge > 64 || q.temporal < 1 || q.temporal > 64)
        throw std::invalid_argument("patch_size, merge_size and temporal_patch_size are out of range");
    QwenJob job;
    job.image = check_image(image, what);
    job.plan = plan_qwen2vl(job.image.height, job.image.width, q.patch, q.merge, q.min_pixels, q.max_pixels);
    out = new_output(lut.half, {static_cast<py::ssize_t>(job.plan.grid_h) * job.plan.grid_w,
                                static_cast<py::ssize_t>(3) * q.temporal * q.patch * q.patch});
    job.out = out.mutable_data();
    return job;
}

void run_qwen_job(const QwenJob& job, const QwenArgs& q, const Lut& lut, Scratch& scratch) {
    const RgbView view = packed_view(job.image, scratch);
    if (lut.half)
        run_qwen2vl(view, job.plan, q.patch, q.merge, q.temporal, static_cast<const uint16_t*>(lut.data),
                    static_cast<uint16_t*>(job.out), scratch);
    else
        run_qwen2vl(view, job.plan, q.patch, q.merge, q.temporal, static_cast<const float*>(lut.data),
                    static_cast<float*>(job.out), scratch);
}

py::tuple grid_thw(const Qwen2VLPlan& plan) { return py::make_tuple(1, plan.grid_h, plan.grid_w); }

struct Phi3VJob {
    StridedImage image;
    Phi3VPlan plan;
    float* out;
};

Phi3VJob prepare_phi3v(const py::handle& image, const std::string& what, int num_crops, const Lut& lut,
                       py::array& out) {
    if (lut.half) throw std::invalid_argument("phi3v: lut must be float32 (the official outputs are float32)");
    Phi3VJob job;
    job.image = check_image(image, what);
    try {
        job.plan = plan_phi3v(job.image.height, job.image.width, num_crops);
    } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(what + " (" + std::to_string(job.image.width) + "x" +
                                    std::to_string(job.image.height) + "): " + e.what());
    }
    out = new_output(false, {num_crops + 1, 3, kPhi3VCrop, kPhi3VCrop});
    job.out = static_cast<float*>(out.mutable_data());
    return job;
}

void run_phi3v_job(const Phi3VJob& job, const Lut& lut, Scratch& scratch) {
    run_phi3v(packed_view(job.image, scratch), job.plan, static_cast<const float*>(lut.data), job.out, scratch);
}

// (pixel_values, image_size (h, w), num_img_tokens), as Phi3VImageProcessor returns them for one image.
py::tuple phi3v_result(const py::array& out, const Phi3VPlan& plan) {
    return py::make_tuple(out, py::make_tuple(plan.hd_h, plan.hd_w), plan.tokens());
}

int hardware_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

int resolve_threads(int num_threads) {
    if (num_threads < 0) throw std::invalid_argument("num_threads must be >= 0");
    return num_threads == 0 ? hardware_threads() : num_threads;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "vlm2vec-rt native core: image tiling for anyres / Qwen2-VL / Phi-3.5-V inputs";

    m.def("hardware_threads", &hardware_threads,
          "Number of hardware threads the tiling pool may use (num_threads=0).");

    m.def(
        "set_buffer_cache",
        [](int64_t bytes) {
            if (bytes < 0) throw std::invalid_argument("the buffer cache limit must be >= 0");
            BufferPool::instance().set_limit(static_cast<size_t>(bytes));
        },
        py::arg("bytes"), "Bytes of freed output buffers kept for reuse (0: none).");
    m.def(
        "buffer_cache",
        []() { return py::make_tuple(BufferPool::instance().cached(), BufferPool::instance().limit()); },
        "(bytes cached now, limit).");

    m.def("isa", []() { return std::string(isa_name(active_isa())); }, "Instruction set the kernels use now.");
    m.def("best_isa", []() { return std::string(isa_name(best_isa())); }, "Best instruction set of this CPU.");
    m.def(
        "set_isa",
        [](const std::string& name) {
            if (name == "scalar")
                set_isa(Isa::scalar);
            else if (name == "avx2")
                set_isa(Isa::avx2);
            else if (name == "avx512")
                set_isa(Isa::avx512);
            else if (name == "auto")
                set_isa(best_isa());
            else
                throw std::invalid_argument("isa must be 'scalar', 'avx2', 'avx512' or 'auto'");
            return std::string(isa_name(active_isa()));
        },
        "Force the kernels' instruction set (tests compare the scalar reference with SIMD).");

    m.def(
        "anyres_plan",
        [](int height, int width, const std::vector<Pinpoint>& pinpoints, int crop) {
            check_anyres_args(pinpoints, crop, 0);
            const AnyresPlan p = plan_anyres(height, width, pinpoints, crop);
            return py::dict(py::arg("best") = py::make_tuple(p.best_h, p.best_w),
                            py::arg("resized") = py::make_tuple(p.resized_h, p.resized_w),
                            py::arg("pad") = py::make_tuple(p.pad_top, p.pad_left),
                            py::arg("grid") = py::make_tuple(p.rows, p.cols), py::arg("views") = p.views());
        },
        py::arg("height"), py::arg("width"), py::arg("grid_pinpoints"), py::arg("crop_size"),
        "Where an image of this size lands in the anyres grid (best resolution, resized size, padding, views).");

    m.def(
        "qwen2vl_plan",
        [](int height, int width, int patch, int merge, int64_t min_pixels, int64_t max_pixels) {
            const Qwen2VLPlan p = plan_qwen2vl(height, width, patch, merge, min_pixels, max_pixels);
            return py::make_tuple(p.resized_h, p.resized_w);
        },
        py::arg("height"), py::arg("width"), py::arg("patch_size"), py::arg("merge_size"), py::arg("min_pixels"),
        py::arg("max_pixels"), "Qwen2-VL smart resize: (height, width) after resizing.");

    m.def(
        "anyres",
        [](const py::object& image, const std::vector<Pinpoint>& pinpoints, int crop, const py::array& lut_arr,
           int resize_to) {
            check_anyres_args(pinpoints, crop, resize_to);
            const Lut lut = check_lut(lut_arr);
            py::array out;
            const AnyresJob job = prepare_anyres(image, "image", pinpoints, crop, resize_to, lut, out);
            {
                py::gil_scoped_release release;
                parallel_for(1, 1, [&](int, Scratch& scratch) { run_anyres_job(job, crop, lut, scratch); });
            }
            return out;
        },
        py::arg("image"), py::arg("grid_pinpoints"), py::arg("crop_size"), py::arg("lut"), py::arg("resize_to") = 0,
        "Anyres views [views, 3, crop, crop] of one uint8 HxWx3 image (resized to resize_to^2 first if > 0).");

    m.def(
        "anyres_batch",
        [](const py::list& images, const std::vector<Pinpoint>& pinpoints, int crop, const py::array& lut_arr,
           int num_threads, int resize_to) {
            check_anyres_args(pinpoints, crop, resize_to);
            const Lut lut = check_lut(lut_arr);
            const int threads = resolve_threads(num_threads);
            const size_t n = images.size();
            std::vector<py::array> outs(n);
            std::vector<AnyresJob> jobs(n);
            for (size_t i = 0; i < n; ++i)
                jobs[i] = prepare_anyres(images[i], "image " + std::to_string(i), pinpoints, crop, resize_to, lut,
                                         outs[i]);
            {
                py::gil_scoped_release release;
                parallel_for(static_cast<int>(n), threads,
                             [&](int i, Scratch& scratch) { run_anyres_job(jobs[i], crop, lut, scratch); });
            }
            py::list result;
            for (auto& o : outs) result.append(o);
            return result;
        },
        py::arg("images"), py::arg("grid_pinpoints"), py::arg("crop_size"), py::arg("lut"), py::arg("num_threads"),
        py::arg("resize_to") = 0, "anyres over a list of images on num_threads threads (0: all hardware threads), GIL released.");

    m.def(
        "qwen2vl",
        [](const py::object& image, int patch, int merge, int temporal, int64_t min_pixels, int64_t max_pixels,
           const py::array& lut_arr) {
            const Lut lut = check_lut(lut_arr);
            const QwenArgs q{patch, merge, temporal, min_pixels, max_pixels};
            py::array out;
            const QwenJob job = prepare_qwen(image, "image", q, lut, out);
            {
                py::gil_scoped_release release;
                parallel_for(1, 1, [&](int, Scratch& scratch) { run_qwen_job(job, q, lut, scratch); });
            }
            return py::make_tuple(out, grid_thw(job.plan));
        },
        py::arg("image"), py::arg("patch_size"), py::arg("merge_size"), py::arg("temporal_patch_size"),
        py::arg("min_pixels"), py::arg("max_pixels"), py::arg("lut"),
        "Qwen2-VL patches [patches, 3*T*P*P] and grid (1, h, w) of one uint8 HxWx3 image.");

    m.def(
        "qwen2vl_batch",
        [](const py::list& images, int patch, int merge, int temporal, int64_t min_pixels, int64_t max_pixels,
           const py::array& lut_arr, int num_threads) {
            const Lut lut = check_lut(lut_arr);
            const int threads = resolve_threads(num_threads);
            const QwenArgs q{patch, merge, temporal, min_pixels, max_pixels};
            const size_t n = images.size();
            std::vector<py::array> outs(n);
            std::vector<QwenJob> jobs(n);
            for (size_t i = 0; i < n; ++i)
                jobs[i] = prepare_qwen(images[i], "image " + std::to_string(i), q, lut, outs[i]);
            {
                py::gil_scoped_release release;
                parallel_for(static_cast<int>(n), threads,
                             [&](int i, Scratch& scratch) { run_qwen_job(jobs[i], q, lut, scratch); });
            }
            py::list result;
            for (size_t i = 0; i < n; ++i) result.append(py::make_tuple(outs[i], grid_thw(jobs[i].plan)));
            return result;
        },
        py::arg("images"), py::arg("patch_size"), py::arg("merge_size"), py::arg("temporal_patch_size"),
        py::arg("min_pixels"), py::arg("max_pixels"), py::arg("lut"), py::arg("num_threads"),
        "qwen2vl over a list of images on num_threads threads (0: all hardware threads), GIL released.");

    m.def(
        "phi3v_plan",
        [](int height, int width, int num_crops) {
            const Phi3VPlan p = plan_phi3v(height, width, num_crops);
            return py::dict(py::arg("transposed") = p.transposed,
                            py::arg("resized") = py::make_tuple(p.resized_h, p.resized_w),
                            py::arg("pad") = py::make_tuple(p.pad_top, p.pad_left),
                            py::arg("image_size") = py::make_tuple(p.hd_h, p.hd_w),
                            py::arg("grid") = py::make_tuple(p.rows, p.cols), py::arg("num_img_tokens") = p.tokens());
        },
        py::arg("height"), py::arg("width"), py::arg("num_crops"),
        "Phi-3.5-V HD transform of an image of this size: resized size, padding, HD size, crop grid, tokens.");

    m.def(
        "phi3v",
        [](const py::object& image, int num_crops, const py::array& lut_arr) {
            const Lut lut = check_lut(lut_arr);
            py::array out;
            const Phi3VJob job = prepare_phi3v(image, "image", num_crops, lut, out);
            {
                py::gil_scoped_release release;
                parallel_for(1, 1, [&](int, Scratch& scratch) { run_phi3v_job(job, lut, scratch); });
            }
            return phi3v_result(out, job.plan);
        },
        py::arg("image"), py::arg("num_crops"), py::arg("lut"),
        "Phi-3.5-V views [num_crops + 1, 3, 336, 336], image size (h, w) and image-token count of one image.");

    m.def(
        "phi3v_batch",
        [](const py::list& images, int num_crops, const py::array& lut_arr, int num_threads) {
            const Lut lut = check_lut(lut_arr);
            const int threads = resolve_threads(num_threads);
            const size_t n = images.size();
            std::vector<py::array> outs(n);
            std::vector<Phi3VJob> jobs(n);
            for (size_t i = 0; i < n; ++i)
                jobs[i] = prepare_phi3v(images[i], "image " + std::to_string(i), num_crops, lut, outs[i]);
            {
                py::gil_scoped_release release;
                parallel_for(static_cast<int>(n), threads,
                             [&](int i, Scratch& scratch) { run_phi3v_job(jobs[i], lut, scratch); });
            }
            py::list result;
            for (size_t i = 0; i < n; ++i) result.append(phi3v_result(outs[i], jobs[i].plan));
            return result;
        },
        py::arg("images"), py::arg("num_crops"), py::arg("lut"), py::arg("num_threads"),
        "phi3v over a list of images on num_threads threads (0: all hardware threads), GIL released.");

    m.def(
        "resize_bicubic",
        [](const py::object& image, int height, int width) {
            const StridedImage im = check_image(image, "image");
            if (height < 1 || width < 1 || height > kMaxSide || width > kMaxSide ||
                int64_t(height) * width > kMaxPixels)
                throw std::invalid_argument("resize target size out of range");
            py::array out(py::dtype::of<uint8_t>(), std::vector<py::ssize_t>{height, width, 3});
            auto* dst = static_cast<uint8_t*>(out.mutable_data());
            {
                py::gil_scoped_release release;
                parallel_for(1, 1, [&](int, Scratch& scratch) {
                    resize_bicubic(packed_view(im, scratch), height, width, dst, static_cast<ptrdiff_t>(width) * 3,
                                   scratch);
                });
            }
            return out;
        },
        py::arg("image"), py::arg("height"), py::arg("width"),
        "PIL.Image.resize((width, height), BICUBIC) of a uint8 HxWx3 image, bit-exact.");
}
