// Memory for large output arrays, recycled across calls.
//
// A fresh multi-megabyte numpy array costs a page fault and the kernel's zeroing of every page on first
// write, about as much as writing the tiles themselves. Buffers of freed outputs are kept (up to a limit)
// and handed to the next output of the same size, already mapped.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>

namespace vlm2vec {

class BufferPool {
  public:
    static BufferPool& instance();

    static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller outputs use numpy's allocator

    // A 64-byte aligned buffer of at least `bytes` (a multiple of 2 MiB, huge-page backed where the
    // system allows); *capacity receives its real size, to pass back to release().
    void* acquire(size_t bytes, size_t* capacity);
    void release(void* p, size_t capacity);

    void set_limit(size_t bytes);  // frees cached buffers beyond the new limit
    size_t limit() const;
    size_t cached() const;

  private:
    void trim_locked(size_t limit);

    mutable std::mutex mutex_;
    std::multimap<size_t, void*> free_;  // capacity -> buffer
    size_t cached_ = 0;
    size_t limit_ = size_t(1) << 30;
};

}  // namespace vlm2vec
