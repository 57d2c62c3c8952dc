// Image tiling for the vision towers: LLaVA-NeXT anyres views and Qwen2-VL patches.
//
// Same geometry and values as transformers' LlavaNextImageProcessorPil / Qwen2VLImageProcessorPil for
// one image. Rescale + normalise are one lookup per channel value: the caller passes a [3][256] table of
// output values (float32 or float16 bits) computed with exactly the reference's float operations.
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "image.h"

namespace vlm2vec {

using Pinpoint = std::pair<int, int>;  // (height, width), as in image_grid_pinpoints

// Where an image lands in the anyres grid.
struct AnyresPlan {
    int best_h = 0, best_w = 0;        // select_best_resolution
    int resized_h = 0, resized_w = 0;  // aspect-keeping resize inside the best resolution
    int pad_top = 0, pad_left = 0;     // centred; the odd remainder goes bottom / right
    int rows = 0, cols = 0;            // crop-size tiles of the padded canvas
    int views() const { return 1 + rows * cols; }
};

AnyresPlan plan_anyres(int height, int width, const std::vector<Pinpoint>& pinpoints, int crop);

// Qwen2-VL smart resize: both sides multiples of patch * merge, pixel count within [min, max].
struct Qwen2VLPlan {
    int resized_h = 0, resized_w = 0;
    int grid_h = 0, grid_w = 0;  // in patches
};

Qwen2VLPlan plan_qwen2vl(int height, int width, int patch, int merge, int64_t min_pixels, int64_t max_pixels);

// An input array's layout: any strides (bytes) for rows, pixels and channels.
struct StridedImage {
    const uint8_t* data = nullptr;
    ptrdiff_t row_stride = 0, pixel_stride = 0, channel_stride = 0;
    int height = 0, width = 0;
};

// A packed view of `image` (no copy when its pixels already are packed RGB).
RgbView packed_view(const StridedImage& image, Scratch& scratch);

// out: [views, 3, crop, crop] (contiguous). T is float or uint16_t (IEEE half bits); lut: [3][256].
template <class T>
void run_anyres(const RgbView& image, const AnyresPlan& plan, int crop, const T* lut, T* out, Scratch& scratch);

// out: [grid_h * grid_w, 3 * temporal * patch * patch] (contiguous), rows in Qwen2-VL's merge order.
template <class T>
void run_qwen2vl(const RgbView& image, const Qwen2VLPlan& plan, int patch, int merge, int temporal, const T* lut,
                 T* out, Scratch& scratch);

// fn(i, scratch) for i in [0, n) on `threads` threads (the caller's included), dynamic scheduling;
// the first exception is rethrown after every thread has finished.
void parallel_for(int n, int threads, const std::function<void(int, Scratch&)>& fn);

}  // namespace vlm2vec
