// Per-thread scratch memory: cache-line aligned and left uninitialized.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>

namespace cpuattn {

// n elements of a trivial type T, 64-byte (cache line) aligned, not initialized: allocating
// writes nothing, so a thread's scratch is first touched (its pages placed, on a NUMA machine)
// by the thread that uses it, and no memset precedes the work. Every reader writes before it
// reads, or checks a flag that says so (StagedTileCache). Allocated before the parallel region: a
// std::bad_alloc here is an exception (MemoryError), in an OpenMP region it would terminate.
template <typename T>
class AlignedBuffer {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>,
                "AlignedBuffer holds trivial types only: it never constructs or destroys them");

 public:
  static constexpr std::align_val_t kAlign{64};

  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t n) { allocate(n); }

  // Replaces the contents by n uninitialized elements (none: nullptr).
  void allocate(int64_t n) {
    if (n > 0 && static_cast<uint64_t>(n) > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    data_.reset(n > 0 ? static_cast<T*>(::operator new(sizeof(T) * static_cast<size_t>(n), kAlign))
                      : nullptr);
    size_ = n > 0 ? n : 0;
  }

  T* data() const { return data_.get(); }
  T& operator[](int64_t i) const { return data_.get()[i]; }
  int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, kAlign); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t size_ = 0;
};

}  // namespace cpuattn
