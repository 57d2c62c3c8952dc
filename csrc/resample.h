// Pillow-exact bicubic resampling of uint8 RGB images.
//
// Reproduces PIL.Image.resize(size, Resampling.BICUBIC) (no box, no reducing_gap) bit for bit, which
// is what transformers' Pil image processors call: a separable convolution (the pass order chosen
// as Pillow 13 chooses it), the filter support widened by the scale when downscaling (antialiasing),
// coefficients in 22-bit fixed point, the intermediate image rounded and clipped to uint8 between
// the passes. Pillow is pinned (pyproject.toml); a Pillow that orders passes differently differs by
// rounding only, which the tests would flag.
#pragma once

#include <vector>

#include "image.h"

namespace vlm2vec {

// Fixed-point taps of one direction of a resize: output i reads count[i] inputs from first[i].
struct Taps {
    int out_size = 0;
    int ksize = 0;               // coefficients stored per output (>= every count)
    std::vector<int> first;      // [out_size]
    std::vector<int> count;      // [out_size]
    std::vector<int32_t> coeff;  // [out_size * ksize], scaled by 2^22
};

Taps bicubic_taps(int in_size, int out_size);

// Resize `src` to out_h x out_w into dst (packed RGB rows of out_w * 3 bytes, dst_stride apart).
void resize_bicubic(const RgbView& src, int out_h, int out_w, uint8_t* dst, ptrdiff_t dst_stride,
                    Scratch& scratch);

}  // namespace vlm2vec
