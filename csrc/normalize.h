// Rescale + normalise + channels-first in one pass: packed uint8 RGB -> three output planes, each value
// looked up in a per-channel table of 256 outputs (float32, or float16 bits). A table lookup is exact by
// construction, so the SIMD kernels (AVX-512 permutes) give the scalar reference's bits.
#pragma once

#include <cstdint>

namespace vlm2vec {

// d0[i] = lut[0][src[3i]], d1[i] = lut[256 + src[3i+1]], d2[i] = lut[512 + src[3i+2]] for i < n.
// stream: write with non-temporal stores (outputs far larger than the caches, read later by someone
// else); the caller issues `store_fence()` before handing the memory over.
void lut_to_planes(const uint8_t* src, int n, const float* lut, float* d0, float* d1, float* d2, bool stream);
void lut_to_planes(const uint8_t* src, int n, const uint16_t* lut, uint16_t* d0, uint16_t* d1, uint16_t* d2,
                   bool stream);

// One channel of n pixels: d[i] = lut_c[src[3i]] (src already offset to the channel). Inline: Qwen2-VL
// calls it for every 14-pixel run of every patch.
template <class T>
inline void lut_channel(const uint8_t* src, int n, const T* lut_c, T* d) {
    for (int i = 0; i < n; ++i) d[i] = lut_c[src[3 * i]];
}

// Orders earlier non-temporal stores before anything that follows (a no-op without SIMD).
void store_fence();

}  // namespace vlm2vec
