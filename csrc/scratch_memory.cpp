// AlignedBuffer's memory: small blocks recycled per thread (aligned_buffer.h says why).
#include <cstddef>
#include <new>
#include <vector>

#include "aligned_buffer.h"

namespace cpuattn {
namespace {

constexpr std::align_val_t kAlign{64};

#if defined(__has_feature)
#if __has_feature(address_sanitizer)  // clang's way of saying so
#define CPUATTN_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(CPUATTN_ASAN)
// Under AddressSanitizer every block goes back to the allocator, which can then report a
// use after free that a recycled block would hide.
constexpr bool kRecycle = false;
#else
constexpr bool kRecycle = true;
#endif

// Set when this thread's recycler is destroyed (thread exit): a buffer freed after that, by
// another thread-local's destructor, goes straight back to the allocator. Trivially
// destructible, so it stays readable to the end.
thread_local bool recycler_gone = false;

// Kept blocks with their exact sizes, the last freed last. A request takes the last kept
// block of its size: a call that repeats the previous one's shapes gets back the very blocks
// it used, in the same places. Past kRecycledBytes the oldest blocks are freed, not the one
// coming in: a call's threads free their scratch last-first, so the blocks freed last are
// those its first threads take again first (and sizes no longer asked for age out). Exact
// sizes, not size classes: blocks rounded up to powers of two moved the buffers against each
// other and changed sentence-sized heads' times by -10 to +20 % from one process to the next.
struct Recycler {
  struct Block {
    size_t bytes;
    void* p;
  };
  std::vector<Block> kept;
  size_t kept_bytes = 0;

  ~Recycler() {
    for (const Block& b : kept) ::operator delete(b.p, kAlign);
    recycler_gone = true;
  }
};

Recycler& recycler() {
  thread_local Recycler r;
  return r;
}

}  // namespace

void* scratch_allocate(size_t bytes) {
  if (kRecycle && bytes <= kRecycledBlockBytes && !recycler_gone) {
    Recycler& r = recycler();
    for (size_t i = r.kept.size(); i-- > 0;) {
      if (r.kept[i].bytes == bytes) {
        void* p = r.kept[i].p;
        r.kept.erase(r.kept.begin() + static_cast<std::ptrdiff_t>(i));
        r.kept_bytes -= bytes;
        return p;
      }
    }
  }
  return ::operator new(bytes, kAlign);
}

void scratch_release(void* p, size_t bytes) noexcept {
  if (p == nullptr) return;
  if (kRecycle && bytes <= kRecycledBlockBytes && !recycler_gone) {
    Recycler& r = recycler();
    size_t oldest = 0;  // the kept blocks [0, oldest) are freed
    while (r.kept_bytes + bytes > kRecycledBytes) {
      r.kept_bytes -= r.kept[oldest].bytes;
      ::operator delete(r.kept[oldest++].p, kAlign);
    }
    r.kept.erase(r.kept.begin(), r.kept.begin() + static_cast<std::ptrdiff_t>(oldest));
    try {
      r.kept.push_back({bytes, p});
      r.kept_bytes += bytes;
      return;
    } catch (const std::bad_alloc&) {  // no room to remember it: free it instead
    }
  }
  ::operator delete(p, kAlign);
}

}  // namespace cpuattn
