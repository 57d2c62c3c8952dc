// Pillow-exact resampling of uint8 RGB images, bicubic and bilinear.
//
// Reproduces PIL.Image.resize(size, Resampling.BICUBIC / BILINEAR) (no box, no reducing_gap) bit for
// bit: bicubic is what transformers' Pil image processors call, bilinear what torchvision's resize of a
// PIL image calls (Phi-3.5-V). A separable convolution (the pass order chosen as Pillow 13 chooses it),
// the filter support widened by the scale when downscaling (antialiasing), coefficients in 22-bit fixed
// point, the intermediate image rounded and clipped to uint8 between the passes. Pillow is pinned
// (pyproject.toml); a Pillow that orders passes differently differs by rounding only, which the tests
// would flag.
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

// Pillow's resampling filters. Their taps are computed alike (precompute_coeffs: support widened by the
// scale when downscaling, normalised, 22-bit fixed point); only the filter function and its support differ.
enum class Filter { bilinear, bicubic };

Taps filter_taps(Filter filter, int in_size, int out_size);
inline Taps bicubic_taps(int in_size, int out_size) { return filter_taps(Filter::bicubic, in_size, out_size); }

// The two separable passes, for any filter's taps; each rounds and clips to uint8 as Pillow's 8bpc passes.
// Horizontal (ImagingResampleHorizontal_8bpc): rows [y0, y0 + rows) of src, t.out_size pixels wide, to dst
// rows 0 .. rows - 1. Uses scratch.taps and scratch.temp2.
void horizontal_pass(const RgbView& src, int y0, int rows, const Taps& t, uint8_t* dst, ptrdiff_t dst_stride,
                     Scratch& scratch);
// Vertical (ImagingResampleVertical_8bpc): t.out_size rows of src.width pixels.
void vertical_pass(const RgbView& src, const Taps& t, uint8_t* dst, ptrdiff_t dst_stride);

// Both passes, horizontal first (over only the input rows the vertical pass reads) or vertical first; a
// null `tx` / `ty` skips that direction (both null: a copy). The intermediate image lives in scratch.temp.
// dst: ty->out_size rows of tx->out_size packed pixels (the source's sizes for a skipped direction).
void resample(const RgbView& src, const Taps* tx, const Taps* ty, bool horizontal_first, uint8_t* dst,
              ptrdiff_t dst_stride, Scratch& scratch);

// Resize `src` to out_h x out_w into dst (packed RGB rows of out_w * 3 bytes, dst_stride apart), with the
// pass order Pillow 13 picks for these sizes (pillow_horizontal_first).
void resize_bicubic(const RgbView& src, int out_h, int out_w, uint8_t* dst, ptrdiff_t dst_stride,
                    Scratch& scratch);

// ImagingResampleInner's pass order (Pillow 13): horizontal first unless the height shrinks by more than
// twice as many pixels as the width. The intermediate rounding depends on it.
inline bool pillow_horizontal_first(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w) {
    const int64_t shrink_h = in_h - out_h, shrink_w = in_w - out_w;
    return !(shrink_h > 0 && shrink_h > shrink_w * 2);
}

}  // namespace vlm2vec
