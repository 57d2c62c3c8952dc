// Image views, scratch buffers and the SIMD switch shared by the resampler and the tiling.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

namespace vlm2vec {

// A read-only uint8 RGB image whose pixels are packed (3 bytes, channels adjacent); rows may be
// anywhere (any row stride, negative included), so numpy views need no copy.
struct RgbView {
    const uint8_t* data = nullptr;  // pixel (0, 0)
    ptrdiff_t row_stride = 0;       // bytes from one row to the next
    int height = 0;
    int width = 0;

    const uint8_t* row(int y) const { return data + static_cast<ptrdiff_t>(y) * row_stride; }
};

// A growable, uninitialised byte buffer: reused across the images one worker thread handles, so a
// batch does not pay an allocation (and its page faults) per image.
class Buffer {
  public:
    uint8_t* get(size_t bytes) {
        if (bytes > capacity_) {
            // 64 spare, zeroed bytes: a safety margin after the last row.
            data_.reset(new uint8_t[bytes + 64]);
            std::memset(data_.get() + bytes, 0, 64);
            capacity_ = bytes;
        }
        return data_.get();
    }

    size_t capacity() const { return capacity_; }

  private:
    std::unique_ptr<uint8_t[]> data_;
    size_t capacity_ = 0;
};

// Per-thread working memory of the tiling and the resampler.
struct Scratch {
    Buffer packed;     // the input repacked, when its pixels are not packed RGB
    Buffer square;     // the input resized to a square first (VLM2Vec "high" resolution)
    Buffer resized;    // output of a resize
    Buffer temp;       // the resampler's intermediate (first pass) image
    Buffer taps;       // SIMD horizontal pass: transposed input columns
    Buffer temp2;      // SIMD horizontal pass: transposed output columns

    size_t bytes() const {
        return packed.capacity() + square.capacity() + resized.capacity() + temp.capacity() + taps.capacity() +
               temp2.capacity();
    }
};

// Which instruction set the kernels use. Detected once; tests force "scalar" to compare paths.
enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };  // avx512: F + BW
Isa active_isa();
Isa best_isa();
void set_isa(Isa isa);  // clamped to best_isa()
const char* isa_name(Isa isa);

}  // namespace vlm2vec
