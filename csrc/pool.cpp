// Recycled output buffers (see pool.h).
#include "pool.h"

#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vlm2vec {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
}

BufferPool& BufferPool::instance() {
    static BufferPool* pool = new BufferPool();  // never destroyed: capsules may release at interpreter exit
    return *pool;
}

void* BufferPool::acquire(size_t bytes, size_t* capacity) {
    const size_t cap = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = free_.find(cap);
        if (it != free_.end()) {
            void* p = it->second;
            free_.erase(it);
            cached_ -= cap;
            *capacity = cap;
            return p;
        }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, cap) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, cap, MADV_HUGEPAGE);  // a hint: fewer faults and TLB misses where THP is on "madvise"
#endif
    *capacity = cap;
    return p;
}

void BufferPool::release(void* p, size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cached_ + capacity > limit_) {
        std::free(p);
        return;
    }
    free_.emplace(capacity, p);
    cached_ += capacity;
}

void BufferPool::trim_locked(size_t limit) {
    while (cached_ > limit && !free_.empty()) {
        auto it = std::prev(free_.end());  // the largest first
        cached_ -= it->first;
        std::free(it->second);
        free_.erase(it);
    }
}

void BufferPool::set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked(bytes);
}

size_t BufferPool::limit() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
}

size_t BufferPool::cached() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
}

}  // namespace vlm2vec
