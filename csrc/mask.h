// Which keys a query row may see, from causal / window / kv_lengths, and tile classification.
// Keys kept by row i are the half-open range [lo(i), hi(i)); both ends are non-decreasing in i,
// so a tile of rows [i_first, i_last] sees keys only inside [lo(i_first), hi(i_last)).
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

#include "types.h"  // KeyRange

namespace cpuattn {

// A tile-aligned range of keys one task visits (split-KV), half-open.
struct KeyChunk {
  int64_t begin, end;
};

struct RowBounds {
  int64_t n_keys;   // valid keys for this batch entry (kv_lengths[b] or Lk)
  int64_t offset;   // row i's diagonal is key i + offset: n_keys - Lq (bottom-right), 0
                    // (top-left) or the caller's diagonal
  bool causal;
  int64_t left, right;  // window, -1 = unbounded

  KeyRange of_row(int64_t i) const {
    const int64_t diag = i + offset;
    int64_t lo = 0, hi = n_keys;
    if (left >= 0) lo = std::max<int64_t>(lo, diag - left);
    if (causal) hi = std::min<int64_t>(hi, diag + 1);
    if (right >= 0) hi = std::min<int64_t>(hi, diag + right + 1);
    lo = std::min(lo, n_keys);  // so that an empty range never points past the valid keys
    return {lo, std::max(lo, hi)};
  }
};

enum class TileKind { Skip, Full, Partial };

// Rows [i_first, i_last] against keys [j0, j1). Full means every pair is kept by the bounds
// (a user mask still applies elementwise), Skip means none is.
inline TileKind classify_tile(const RowBounds& rb, int64_t i_first, int64_t i_last, int64_t j0,
                              int64_t j1) {
  const KeyRange first = rb.of_row(i_first), last = rb.of_row(i_last);
  if (j1 <= first.lo || j0 >= last.hi) return TileKind::Skip;
  // Every row keeps [lo(i_last), hi(i_first)) at least.
  if (j0 >= last.lo && j1 <= first.hi) return TileKind::Full;
  return TileKind::Partial;
}

}  // namespace cpuattn
