// Per-thread scratch memory: cache-line aligned and left uninitialized.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace cpuattn {

// 64-byte aligned memory for AlignedBuffer (scratch_memory.cpp). Blocks of up to
// kRecycledBlockBytes are kept by the thread that frees them, up to kRecycledBytes a thread,
// and handed out again, by exact size, to the next call on it: a small call builds a few
// dozen buffers (rows, scores, sums, positions), which through aligned new and delete cost
// 1 us, as much as its work. Larger blocks go straight to the allocator.
inline constexpr size_t kRecycledBlockBytes = size_t(1) << 18;
inline constexpr size_t kRecycledBytes = size_t(1) << 20;
void* scratch_allocate(size_t bytes);                 // throws std::bad_alloc
void scratch_release(void* p, size_t bytes) noexcept;  // `bytes` as allocated

// n elements of a trivial type T, 64-byte (cache line) aligned, not initialized: allocating
// writes nothing, so no memset precedes the work, and a large buffer is first touched (its
// pages placed, on a NUMA machine) by the thread that uses it; a small recycled one was
// touched by an earlier call. Every reader writes before it reads, or checks a flag that says
// so (StagedTileCache). Allocated before the parallel region: a std::bad_alloc here is an
// exception (MemoryError), in an OpenMP region it would terminate.
template <typename T>
class AlignedBuffer {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>,
                "AlignedBuffer holds trivial types only: it never constructs or destroys them");
  static_assert(alignof(T) <= 64, "AlignedBuffer aligns to 64 bytes");

 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t n) { allocate(n); }

  // Replaces the contents by n uninitialized elements (none: nullptr).
  void allocate(int64_t n) {
    if (n > 0 && static_cast<uint64_t>(n) > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    data_.reset();
    size_ = 0;
    if (n <= 0) return;
    const size_t bytes = sizeof(T) * static_cast<size_t>(n);
    data_ = std::unique_ptr<T, Free>(static_cast<T*>(scratch_allocate(bytes)), Free{bytes});
    size_ = n;
  }

  T* data() const { return data_.get(); }
  T& operator[](int64_t i) const { return data_.get()[i]; }
  int64_t size() const { return size_; }

 private:
  struct Free {
    size_t bytes = 0;
    void operator()(T* p) const { scratch_release(p, bytes); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t size_ = 0;
};

// One scratch object per thread of a call, destroyed last-first: their blocks go back to the
// recycler in the reverse order of their allocation, so that a call like the last one hands
// each thread the blocks it used (in its own core's cache), not another thread's.
template <typename S>
class ThreadScratch {
 public:
  explicit ThreadScratch(int threads) { items_.reserve(static_cast<size_t>(threads)); }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch() {
    while (!items_.empty()) items_.pop_back();
  }

  template <typename... Args>
  void add(Args&&... args) {
    items_.emplace_back(std::forward<Args>(args)...);
  }
  S& operator[](int t) { return items_[static_cast<size_t>(t)]; }

 private:
  std::vector<S> items_;
};

}  // namespace cpuattn
