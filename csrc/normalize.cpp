// Table-driven rescale + normalise (see normalize.h): scalar reference and AVX-512 kernels.
#include "normalize.h"

#include "image.h"

// GCC 12 warns inside its own AVX-512 intrinsics headers (_mm512_undefined_*): a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VLM2VEC_X86 1
#endif

namespace vlm2vec {

namespace {

template <class T>
void planes_scalar(const uint8_t* src, int n, const T* lut, T* d0, T* d1, T* d2) {
    const T* l0 = lut;
    const T* l1 = lut + 256;
    const T* l2 = lut + 512;
    for (int i = 0; i < n; ++i) {
        d0[i] = l0[src[3 * i + 0]];
        d1[i] = l1[src[3 * i + 1]];
        d2[i] = l2[src[3 * i + 2]];
    }
}

#ifdef VLM2VEC_X86
// Channel c's bytes of 8 packed RGB pixels (24 bytes at p) in the low 8 bytes.
__attribute__((target("avx512f,avx512bw"))) inline __m128i channel8(const uint8_t* p, int c) {
    static const int8_t lo_pick[3][16] = {
        {0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
        {1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
        {2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
    };
    static const int8_t hi_pick[3][16] = {  // bytes 8..23, i.e. pixels from 16/3 on
        {-1, -1, -1, -1, -1, -1, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1},
        {-1, -1, -1, -1, -1, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1},
        {-1, -1, -1, -1, -1, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1},
    };
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
    return _mm_or_si128(_mm_shuffle_epi8(lo, _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo_pick[c]))),
                        _mm_shuffle_epi8(hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi_pick[c]))));
}

// Channel c of 16 pixels (48 bytes at p), as 16 bytes.
__attribute__((target("avx512f,avx512bw"))) inline __m128i channel16(const uint8_t* p, int c) {
    return _mm_unpacklo_epi64(channel8(p, c), channel8(p + 24, c));
}

// 256-entry float table held as 8 pairs of 16: bits 0-4 of an index pick within a pair, bits 5-7 the pair.
struct FloatTable {
    __m512 t[16];
};

__attribute__((target("avx512f,avx512bw"))) inline __m512 lookup(const FloatTable& tb, __m512i idx) {
    __m512 r[8];
    for (int p = 0; p < 8; ++p) r[p] = _mm512_permutex2var_ps(tb.t[2 * p], idx, tb.t[2 * p + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    for (int p = 0; p < 4; ++p) r[p] = _mm512_mask_blend_ps(b5, r[2 * p], r[2 * p + 1]);
    for (int p = 0; p < 2; ++p) r[p] = _mm512_mask_blend_ps(b6, r[2 * p], r[2 * p + 1]);
    return _mm512_mask_blend_ps(b7, r[0], r[1]);
}

// 256-entry uint16 table held as 4 pairs of 32: bits 0-5 pick within a pair, bits 6-7 the pair.
struct HalfTable {
    __m512i t[8];
};

__attribute__((target("avx512f,avx512bw"))) inline __m512i lookup(const HalfTable& tb, __m512i idx) {
    __m512i r[4];
    for (int p = 0; p < 4; ++p) r[p] = _mm512_permutex2var_epi16(tb.t[2 * p], idx, tb.t[2 * p + 1]);
    const __mmask32 b6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
    const __mmask32 b7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
    r[0] = _mm512_mask_blend_epi16(b6, r[0], r[1]);
    r[1] = _mm512_mask_blend_epi16(b6, r[2], r[3]);
    return _mm512_mask_blend_epi16(b7, r[0], r[1]);
}

// One channel of n pixels (src at the pixel, not the channel) into d: 16 (float) or 32 (half) at a time.
__attribute__((target("avx512f,avx512bw"))) void channel_avx512(const uint8_t* src, int c, int n,
                                                              const float* lut_c, float* d, bool stream) {
    FloatTable tb;
    for (int k = 0; k < 16; ++k) tb.t[k] = _mm512_loadu_ps(lut_c + 16 * k);
    int i = 0;
    if (stream)  // non-temporal stores need 64-byte alignment: the scalar head gets there
        for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 63); ++i) d[i] = lut_c[src[3 * i + c]];
    for (; i + 16 <= n; i += 16) {
        const __m512 v = lookup(tb, _mm512_cvtepu8_epi32(channel16(src + 3 * i, c)));
        if (stream)
            _mm512_stream_ps(d + i, v);
        else
            _mm512_storeu_ps(d + i, v);
    }
    for (; i < n; ++i) d[i] = lut_c[src[3 * i + c]];
}

__attribute__((target("avx512f,avx512bw"))) void channel_avx512(const uint8_t* src, int c, int n,
                                                              const uint16_t* lut_c, uint16_t* d, bool stream) {
    HalfTable tb;
    for (int k = 0; k < 8; ++k) tb.t[k] = _mm512_loadu_si512(lut_c + 32 * k);
    int i = 0;
    if (stream)
        for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 63); ++i) d[i] = lut_c[src[3 * i + c]];
    for (; i + 32 <= n; i += 32) {
        const __m256i bytes = _mm256_set_m128i(channel16(src + 3 * i + 48, c), channel16(src + 3 * i, c));
        const __m512i v = lookup(tb, _mm512_cvtepu8_epi16(bytes));
        if (stream)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), v);
        else
            _mm512_storeu_si512(d + i, v);
    }
    for (; i < n; ++i) d[i] = lut_c[src[3 * i + c]];
}
#endif  // VLM2VEC_X86

template <class T>
void planes(const uint8_t* src, int n, const T* lut, T* d0, T* d1, T* d2, bool stream) {
#ifdef VLM2VEC_X86
    if (active_isa() == Isa::avx512 && n >= 32) {
        // A channel at a time keeps that channel's table in registers.
        channel_avx512(src, 0, n, lut, d0, stream);
        channel_avx512(src, 1, n, lut + 256, d1, stream);
        channel_avx512(src, 2, n, lut + 512, d2, stream);
        return;
    }
#endif
    (void)stream;
    planes_scalar(src, n, lut, d0, d1, d2);
}

}  // namespace

void lut_to_planes(const uint8_t* src, int n, const float* lut, float* d0, float* d1, float* d2, bool stream) {
    planes(src, n, lut, d0, d1, d2, stream);
}

void lut_to_planes(const uint8_t* src, int n, const uint16_t* lut, uint16_t* d0, uint16_t* d1, uint16_t* d2,
                   bool stream) {
    planes(src, n, lut, d0, d1, d2, stream);
}

void store_fence() {
#ifdef VLM2VEC_X86
    _mm_sfence();
#endif
}

}  // namespace vlm2vec
