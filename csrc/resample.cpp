// Pillow-exact resampling (see resample.h). The arithmetic mirrors Pillow's
// src/libImaging/Resample.c (precompute_coeffs, normalize_coeffs_8bpc, ImagingResample*_8bpc,
// ImagingResampleInner) so every output byte matches; the SIMD kernels (AVX2, AVX-512) do the same
// integer sums.
#include "resample.h"

// GCC 12 warns inside its own AVX-512 intrinsics headers (_mm512_undefined_*): a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VLM2VEC_X86 1
#endif

namespace vlm2vec {

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow's PRECISION_BITS
constexpr int kHalf = 1 << (kPrecisionBits - 1);
constexpr double kBilinearSupport = 1.0;
constexpr double kBicubicSupport = 2.0;

// Pillow's bilinear_filter (a triangle), written with the same operation order.
inline double bilinear(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return 1.0 - x;
    return 0.0;
}

// Pillow's bicubic_filter (a = -0.5), written with the same operation order.
inline double bicubic(double x) {
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

inline uint8_t clip8(int v) {
    v >>= kPrecisionBits;  // arithmetic shift, as Pillow's clip8 lookup index
    return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

std::atomic<int> g_isa{-1};

Isa detect_isa() {
#if defined(VLM2VEC_X86) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::avx512;
    if (__builtin_cpu_supports("avx2")) return Isa::avx2;
#endif
    return Isa::scalar;
}

// ---- scalar kernels (the reference path) -----------------------------------------------------

void horizontal_scalar(const RgbView& src, int y0, int rows, const Taps& t, uint8_t* dst,
                       ptrdiff_t dst_stride) {
    for (int r = 0; r < rows; ++r) {
        const uint8_t* in = src.row(y0 + r);
        uint8_t* out = dst + r * dst_stride;
        for (int x = 0; x < t.out_size; ++x) {
            const int32_t* k = &t.coeff[static_cast<size_t>(x) * t.ksize];
            const uint8_t* p = in + static_cast<ptrdiff_t>(t.first[x]) * 3;
            int s0 = kHalf, s1 = kHalf, s2 = kHalf;
            for (int i = 0; i < t.count[x]; ++i) {
                s0 += p[3 * i + 0] * k[i];
                s1 += p[3 * i + 1] * k[i];
                s2 += p[3 * i + 2] * k[i];
            }
            out[3 * x + 0] = clip8(s0);
            out[3 * x + 1] = clip8(s1);
            out[3 * x + 2] = clip8(s2);
        }
    }
}

// Vertical pass on packed rows: channels are independent, so a row is just width * 3 bytes.
// Bytes [j0, j1) of output row y (also the SIMD kernels' tails).
inline void vertical_bytes(const RgbView& src, const Taps& t, int y, int j0, int j1, uint8_t* out) {
    const int32_t* k = &t.coeff[static_cast<size_t>(y) * t.ksize];
    for (int j = j0; j < j1; ++j) {
        int s = kHalf;
        for (int i = 0; i < t.count[y]; ++i) s += src.row(t.first[y] + i)[j] * k[i];
        out[j] = clip8(s);
    }
}

void vertical_scalar(const RgbView& src, const Taps& t, uint8_t* dst, ptrdiff_t dst_stride) {
    for (int y = 0; y < t.out_size; ++y) vertical_bytes(src, t, y, 0, src.width * 3, dst + y * dst_stride);
}

#ifdef VLM2VEC_X86
// ---- AVX2 kernels ------------------------------------------------------------------------------

__attribute__((target("avx2"))) inline __m256i vertical_load(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2"))) inline __m128i vertical_pack8(__m256i acc) {
    acc = _mm256_srai_epi32(acc, kPrecisionBits);
    __m128i s = _mm_packs_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    return _mm_packus_epi16(s, s);
}

// Four 8-lane sums -> 32 bytes in order (>> 22, clipped to [0, 255] by the saturating packs).
__attribute__((target("avx2"))) inline __m256i pack32(__m256i a0, __m256i a1, __m256i a2, __m256i a3,
                                                     __m256i order) {
    const int sh = kPrecisionBits;
    const __m256i p01 = _mm256_packs_epi32(_mm256_srai_epi32(a0, sh), _mm256_srai_epi32(a1, sh));
    const __m256i p23 = _mm256_packs_epi32(_mm256_srai_epi32(a2, sh), _mm256_srai_epi32(a3, sh));
    return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
}

// 8x8 transpose of 32-bit elements: r[i] holds row i; afterwards r[c] holds column c.
__attribute__((target("avx2"))) inline void transpose8(__m256i r[8]) {
    __m256i a[8], b[8];
    for (int i = 0; i < 4; ++i) {
        a[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
    for (int i = 0; i < 2; ++i) {
        b[4 * i + 0] = _mm256_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm256_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm256_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm256_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x20);
        r[4 + j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x31);
    }
}

// The horizontal pass run as a vertical one on 8-row strips turned on their side (as the AVX-512 kernel,
// at half the width): each input column becomes 32 contiguous bytes (8 rows x RGBX), every tap 4
// multiply-adds with one broadcast coefficient, and the output columns are transposed back.
__attribute__((target("avx2"))) void horizontal_avx2(const RgbView& src, int y0, int rows, const Taps& t,
                                                     uint8_t* dst, ptrdiff_t dst_stride, Scratch& scratch) {
    const int w = src.width, out_w = t.out_size;
    const int w8 = (w + 7) & ~7, out8 = (out_w + 7) & ~7;
    uint8_t* cols = scratch.taps.get(static_cast<size_t>(w8) * 32);          // input columns
    uint8_t* out_cols = scratch.temp2.get(static_cast<size_t>(out8) * 32);  // output columns
    const __m256i half = _mm256_set1_epi32(kHalf);
    const __m256i six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);  // 24 bytes = 6 dwords
    // 8 packed RGB pixels (24 bytes) <-> 8 RGBX dwords: dwords 0-2 / 3-5 to the two 128-bit lanes, then bytes.
    const __m256i to_lanes = _mm256_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0);
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, 0, 1, 2, -1, 3,
                                            4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    const __m256i pick = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, 0, 1, 2, 4, 5, 6,
                                          8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    const __m256i from_lanes = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);

    for (int s0 = 0; s0 < rows; s0 += 8) {
        const int n_rows = std::min(8, rows - s0);
        for (int x0 = 0; x0 < w8; x0 += 8) {
            const int n_px = std::min(8, w - x0);
            __m256i v[8];
            for (int r = 0; r < 8; ++r) {
                __m256i rgb = _mm256_setzero_si256();
                if (r < n_rows) {
                    const uint8_t* p = src.row(y0 + s0 + r) + 3 * x0;
                    if (n_px == 8) {  // a masked load reads exactly the 24 bytes
                        rgb = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), six);
                    } else {
                        alignas(32) uint8_t tail[32] = {};
                        std::memcpy(tail, p, static_cast<size_t>(n_px) * 3);
                        rgb = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
                    }
                }
                v[r] = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(rgb, to_lanes), spread);
            }
            transpose8(v);
            for (int c = 0; c < 8; ++c)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + static_cast<size_t>(x0 + c) * 32), v[c]);
        }
        for (int x = 0; x < out_w; ++x) {
            const int32_t* k = &t.coeff[static_cast<size_t>(x) * t.ksize];
            const uint8_t* c = cols + static_cast<size_t>(t.first[x]) * 32;
            __m256i a0 = half, a1 = half, a2 = half, a3 = half;
            for (int i = 0; i < t.count[x]; ++i, c += 32) {
                const __m256i kv = _mm256_set1_epi32(k[i]);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(vertical_load(c), kv));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(vertical_load(c + 8), kv));
                a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(vertical_load(c + 16), kv));
                a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(vertical_load(c + 24), kv));
            }
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_cols + static_cast<size_t>(x) * 32),
                                pack32(a0, a1, a2, a3, order));
        }
        for (int x0 = 0; x0 < out_w; x0 += 8) {
            __m256i v[8];
            for (int c = 0; c < 8; ++c)  // past out_w: junk, never stored
                v[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out_cols + static_cast<size_t>(x0 + c) * 32));
            transpose8(v);
            const int n_px = std::min(8, out_w - x0);
            for (int r = 0; r < n_rows; ++r) {
                // 8 RGBX pixels of output row r -> 24 packed RGB bytes
                const __m256i rgb = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v[r], pick), from_lanes);
                uint8_t* o = dst + (s0 + r) * dst_stride + static_cast<ptrdiff_t>(x0) * 3;
                if (n_px == 8) {
                    _mm256_maskstore_epi32(reinterpret_cast<int*>(o), six, rgb);
                } else {
                    alignas(32) uint8_t tail[32];
                    _mm256_store_si256(reinterpret_cast<__m256i*>(tail), rgb);
                    std::memcpy(o, tail, static_cast<size_t>(n_px) * 3);
                }
            }
        }
    }
}

__attribute__((target("avx2"))) void vertical_avx2(const RgbView& src, const Taps& t, uint8_t* dst,
                                                   ptrdiff_t dst_stride) {
    const int bytes = src.width * 3;
    const __m256i half = _mm256_set1_epi32(kHalf);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int y = 0; y < t.out_size; ++y) {
        const int32_t* k = &t.coeff[static_cast<size_t>(y) * t.ksize];
        const int first = t.first[y], n = t.count[y];
        uint8_t* out = dst + y * dst_stride;
        int j = 0;
        for (; j + 32 <= bytes; j += 32) {
            __m256i a0 = half, a1 = half, a2 = half, a3 = half;
            for (int i = 0; i < n; ++i) {
                const uint8_t* p = src.row(first + i) + j;
                const __m256i kv = _mm256_set1_epi32(k[i]);
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(vertical_load(p), kv));
                a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(vertical_load(p + 8), kv));
                a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(vertical_load(p + 16), kv));
                a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(vertical_load(p + 24), kv));
            }
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), pack32(a0, a1, a2, a3, order));
        }
        for (; j + 8 <= bytes; j += 8) {
            __m256i a0 = half;
            for (int i = 0; i < n; ++i)
                a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(vertical_load(src.row(first + i) + j),
                                                             _mm256_set1_epi32(k[i])));
            _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), vertical_pack8(a0));
        }
        vertical_bytes(src, t, y, j, bytes, out);
    }
}

// ---- AVX-512 kernels: the AVX2 ones at twice the width ------------------------------------------------

// 16 bytes widened to 16 int32 lanes.
__attribute__((target("avx512f,avx512bw"))) inline __m512i load16(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx512f,avx512bw"))) inline __m128i vertical_pack16(__m512i acc) {
    // clip8: >> 22, then clamp to [0, 255] (negative first, as the unsigned narrowing saturates high only)
    acc = _mm512_max_epi32(_mm512_srai_epi32(acc, kPrecisionBits), _mm512_setzero_si512());
    return _mm512_cvtusepi32_epi8(acc);
}

// 16x16 transpose of 32-bit elements: r[i] holds row i; afterwards r[c] holds column c.
__attribute__((target("avx512f,avx512bw"))) inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; ++i) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // b[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3
    for (int i = 0; i < 4; ++i) {
        b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
        const __m512i s0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);
        const __m512i s1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
        const __m512i s2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        const __m512i s3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
        r[j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
        r[4 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    }
}

// The horizontal pass run as a vertical one on 16-row strips turned on their side: a strip's RGBX pixels
// are transposed so that each input column is 64 contiguous bytes (16 rows x RGBX), every tap becomes 4
// full-width multiply-adds with one broadcast coefficient (no per-output reduction), and the output
// columns are transposed back. Same integer sums as the scalar pass.
__attribute__((target("avx512f,avx512bw"))) void horizontal_avx512(const RgbView& src, int y0, int rows,
                                                                 const Taps& t, uint8_t* dst, ptrdiff_t dst_stride,
                                                                 Scratch& scratch) {
    const int w = src.width, out_w = t.out_size;
    const int w16 = (w + 15) & ~15, out16 = (out_w + 15) & ~15;
    uint8_t* cols = scratch.taps.get(static_cast<size_t>(w16) * 64);          // input columns
    uint8_t* out_cols = scratch.temp2.get(static_cast<size_t>(out16) * 64);  // output columns
    const __m512i half = _mm512_set1_epi32(kHalf);
    // 16 packed RGB pixels (48 bytes) <-> 16 RGBX dwords: dwords 3q..3q+2 to 128-bit lane q, then bytes.
    const __m512i to_lanes = _mm512_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0);
    const __m512i spread = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    const __m512i pick = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
    const __m512i from_lanes = _mm512_setr_epi32(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15, 15, 15, 15);

    for (int s0 = 0; s0 < rows; s0 += 16) {
        const int n_rows = std::min(16, rows - s0);
        for (int x0 = 0; x0 < w16; x0 += 16) {
            // Masked loads read only the row's own bytes; rows past the strip are zeros.
            const int n_px = std::min(16, w - x0);
            const __mmask64 m = n_px == 16 ? ~__mmask64(0) >> 16 : (__mmask64(1) << (3 * n_px)) - 1;
            __m512i v[16];
            for (int r = 0; r < 16; ++r) {
                const __m512i rgb = r < n_rows ? _mm512_maskz_loadu_epi8(m, src.row(y0 + s0 + r) + 3 * x0)
                                               : _mm512_setzero_si512();
                v[r] = _mm512_shuffle_epi8(_mm512_permutexvar_epi32(to_lanes, rgb), spread);
            }
            transpose16(v);
            for (int c = 0; c < 16; ++c) _mm512_storeu_si512(cols + static_cast<size_t>(x0 + c) * 64, v[c]);
        }
        for (int x = 0; x < out_w; ++x) {
            const int32_t* k = &t.coeff[static_cast<size_t>(x) * t.ksize];
            const uint8_t* c = cols + static_cast<size_t>(t.first[x]) * 64;
            __m512i a0 = half, a1 = half, a2 = half, a3 = half;
            for (int i = 0; i < t.count[x]; ++i, c += 64) {
                const __m512i kv = _mm512_set1_epi32(k[i]);
                a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(load16(c), kv));
                a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(load16(c + 16), kv));
                a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(load16(c + 32), kv));
                a3 = _mm512_add_epi32(a3, _mm512_mullo_epi32(load16(c + 48), kv));
            }
            uint8_t* o = out_cols + static_cast<size_t>(x) * 64;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o), vertical_pack16(a0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), vertical_pack16(a1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), vertical_pack16(a2));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), vertical_pack16(a3));
        }
        for (int x0 = 0; x0 < out_w; x0 += 16) {
            __m512i v[16];
            for (int c = 0; c < 16; ++c)
                v[c] = _mm512_loadu_si512(out_cols + static_cast<size_t>(x0 + c) * 64);  // past out_w: junk
            transpose16(v);
            const int n_px = std::min(16, out_w - x0);
            const __mmask64 m = n_px == 16 ? ~__mmask64(0) >> 16 : (__mmask64(1) << (3 * n_px)) - 1;
            for (int r = 0; r < n_rows; ++r) {
                // 16 RGBX pixels of output row r -> 48 packed RGB bytes, stored up to the row's end
                const __m512i rgb = _mm512_permutexvar_epi32(from_lanes, _mm512_shuffle_epi8(v[r], pick));
                _mm512_mask_storeu_epi8(dst + (s0 + r) * dst_stride + static_cast<ptrdiff_t>(x0) * 3, m, rgb);
            }
        }
    }
}

__attribute__((target("avx512f,avx512bw"))) void vertical_avx512(const RgbView& src, const Taps& t, uint8_t* dst,
                                                               ptrdiff_t dst_stride) {
    const int bytes = src.width * 3;
    const __m512i half = _mm512_set1_epi32(kHalf);
    for (int y = 0; y < t.out_size; ++y) {
        const int32_t* k = &t.coeff[static_cast<size_t>(y) * t.ksize];
        const int first = t.first[y], n = t.count[y];
        uint8_t* out = dst + y * dst_stride;
        int j = 0;
        for (; j + 64 <= bytes; j += 64) {
            __m512i a0 = half, a1 = half, a2 = half, a3 = half;
            for (int i = 0; i < n; ++i) {
                const uint8_t* p = src.row(first + i) + j;
                const __m512i kv = _mm512_set1_epi32(k[i]);
                a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(load16(p), kv));
                a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(load16(p + 16), kv));
                a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(load16(p + 32), kv));
                a3 = _mm512_add_epi32(a3, _mm512_mullo_epi32(load16(p + 48), kv));
            }
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), vertical_pack16(a0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j + 16), vertical_pack16(a1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j + 32), vertical_pack16(a2));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j + 48), vertical_pack16(a3));
        }
        for (; j + 16 <= bytes; j += 16) {
            __m512i a0 = half;
            for (int i = 0; i < n; ++i) {
                a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(load16(src.row(first + i) + j), _mm512_set1_epi32(k[i])));
            }
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), vertical_pack16(a0));
        }
        vertical_bytes(src, t, y, j, bytes, out);
    }
}
#endif  // VLM2VEC_X86

}  // namespace

Isa best_isa() {
    static const Isa best = detect_isa();
    return best;
}

Isa active_isa() {
    int v = g_isa.load(std::memory_order_relaxed);
    return v < 0 ? best_isa() : static_cast<Isa>(v);
}

void set_isa(Isa isa) {
    g_isa.store(static_cast<int>(std::min(isa, best_isa())), std::memory_order_relaxed);
}

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "scalar"; }

void horizontal_pass(const RgbView& src, int y0, int rows, const Taps& t, uint8_t* dst, ptrdiff_t dst_stride,
                     Scratch& scratch) {
#ifdef VLM2VEC_X86
    const Isa isa = active_isa();
    if (isa == Isa::avx512) return horizontal_avx512(src, y0, rows, t, dst, dst_stride, scratch);
    if (isa == Isa::avx2) return horizontal_avx2(src, y0, rows, t, dst, dst_stride, scratch);
#endif
    (void)scratch;
    horizontal_scalar(src, y0, rows, t, dst, dst_stride);
}

void vertical_pass(const RgbView& src, const Taps& t, uint8_t* dst, ptrdiff_t dst_stride) {
#ifdef VLM2VEC_X86
    const Isa isa = active_isa();
    if (isa == Isa::avx512) return vertical_avx512(src, t, dst, dst_stride);
    if (isa == Isa::avx2) return vertical_avx2(src, t, dst, dst_stride);
#endif
    vertical_scalar(src, t, dst, dst_stride);
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for box (0, in_size), same double arithmetic.
Taps filter_taps(Filter filter, int in_size, int out_size) {
    if (in_size <= 0 || out_size <= 0) throw std::invalid_argument("resize sizes must be positive");
    double (*const fn)(double) = filter == Filter::bilinear ? bilinear : bicubic;
    const double filter_support = filter == Filter::bilinear ? kBilinearSupport : kBicubicSupport;
    Taps t;
    // Pillow takes the box as floats: (double)(in1 - in0) with in0 = 0.
    const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = filter_support * filterscale;
    t.out_size = out_size;
    t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    t.first.resize(out_size);
    t.count.resize(out_size);
    t.coeff.assign(static_cast<size_t>(out_size) * t.ksize, 0);
    std::vector<double> k(t.ksize);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = 0.0 + (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double ww = 0.0;
        for (int x = 0; x < xmax; ++x) {
            const double w = fn((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        int32_t* fixed = &t.coeff[static_cast<size_t>(xx) * t.ksize];
        for (int x = 0; x < xmax; ++x) {
            double v = k[x];
            if (ww != 0.0) v /= ww;
            fixed[x] = v < 0 ? static_cast<int>(-0.5 + v * (1 << kPrecisionBits))
                             : static_cast<int>(0.5 + v * (1 << kPrecisionBits));
        }
        t.first[xx] = xmin;
        t.count[xx] = xmax;
    }
    return t;
}

// ImagingResampleInner's passes: horizontal first over only the rows the vertical pass reads, or vertical
// first over the whole image; the intermediate image is uint8 (rounded and clipped), as Pillow's.
void resample(const RgbView& src, const Taps* tx, const Taps* ty, bool horizontal_first, uint8_t* dst,
              ptrdiff_t dst_stride, Scratch& scratch) {
    const int out_w = tx ? tx->out_size : src.width;
    const int out_h = ty ? ty->out_size : src.height;
    if (!tx && !ty) {
        for (int y = 0; y < out_h; ++y)
            std::memcpy(dst + y * dst_stride, src.row(y), static_cast<size_t>(out_w) * 3);
        return;
    }
    if (!tx) return vertical_pass(src, *ty, dst, dst_stride);
    if (!ty) return horizontal_pass(src, 0, src.height, *tx, dst, dst_stride, scratch);
    if (horizontal_first) {
        const int y_first = ty->first[0];
        const int y_last = ty->first[out_h - 1] + ty->count[out_h - 1];
        Taps tv = *ty;  // its rows counted from y_first, the first row of the intermediate image
        for (int& f : tv.first) f -= y_first;
        const ptrdiff_t temp_stride = static_cast<ptrdiff_t>(out_w) * 3;
        uint8_t* temp = scratch.temp.get(static_cast<size_t>(y_last - y_first) * temp_stride);
        horizontal_pass(src, y_first, y_last - y_first, *tx, temp, temp_stride, scratch);
        vertical_pass(RgbView{temp, temp_stride, y_last - y_first, out_w}, tv, dst, dst_stride);
    } else {
        const ptrdiff_t temp_stride = static_cast<ptrdiff_t>(src.width) * 3;
        uint8_t* temp = scratch.temp.get(static_cast<size_t>(out_h) * temp_stride);
        vertical_pass(src, *ty, temp, temp_stride);
        horizontal_pass(RgbView{temp, temp_stride, out_h, src.width}, 0, out_h, *tx, dst, dst_stride, scratch);
    }
}

// A direction whose size does not change is skipped; an unchanged image is copied.
void resize_bicubic(const RgbView& src, int out_h, int out_w, uint8_t* dst, ptrdiff_t dst_stride,
                    Scratch& scratch) {
    Taps tx, ty;
    if (out_w != src.width) tx = bicubic_taps(src.width, out_w);
    if (out_h != src.height) ty = bicubic_taps(src.height, out_h);
    resample(src, out_w != src.width ? &tx : nullptr, out_h != src.height ? &ty : nullptr,
             pillow_horizontal_first(src.height, src.width, out_h, out_w), dst, dst_stride, scratch);
}

}  // namespace vlm2vec
