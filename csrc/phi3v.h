// Phi-3.5-V image preprocessing: the official Phi3VImageProcessor (HD transform + global view) for one image.
//
// The image (transposed first when it is taller than wide) is resized Pillow-bilinear so that its width is
// a whole number of 336-crops, padded with white to a multiple of 336 in height (centred), normalised,
// cut into 336x336 crops row-major, and preceded by a global view: the normalised HD image resized to
// 336x336 with torch's bicubic interpolate (a = -0.75, no antialiasing). Views after the used crops are
// zeros, up to num_crops + 1.
#pragma once

#include <cstdint>

#include "image.h"

namespace vlm2vec {

constexpr int kPhi3VCrop = 336;
constexpr int kPhi3VMaxCrops = 64;

struct Phi3VPlan {
    bool transposed = false;           // width < height: the official code works on the transposed image
    int resized_h = 0, resized_w = 0;  // after the bilinear resize, in this image's orientation
    int pad_top = 0, pad_left = 0;     // white before the image; the rest goes after it
    int hd_h = 0, hd_w = 0;            // the HD image (image_sizes): multiples of 336
    int rows = 0, cols = 0;            // its 336-crops
    int num_crops = 0;                 // output views: num_crops + 1
    int crops() const { return rows * cols; }
    // num_img_tokens: 144 per crop and for the global view, 1 separator, 12 per crop row + 1.
    int64_t tokens() const {
        return (static_cast<int64_t>(rows) * cols + 1) * 144 + 1 + (static_cast<int64_t>(rows) + 1) * 12;
    }
};

// HD_transform's geometry (calc_hd_transform_size); throws std::invalid_argument when the official code
// would fail (num_crops out of range, or a side resized to 0 pixels).
Phi3VPlan plan_phi3v(int height, int width, int num_crops);

// out: [num_crops + 1, 3, 336, 336] float32 (contiguous); lut: [3][256] float32 normalised values.
void run_phi3v(const RgbView& image, const Phi3VPlan& plan, const float* lut, float* out, Scratch& scratch);

}  // namespace vlm2vec
