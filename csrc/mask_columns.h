// How far into a key tile a step's rows keep keys by the user mask: keys past the last one
// some row keeps are dropped for every row, so the step need not compute them, and a tile no
// row keeps a key of is no step at all. A padded batch's key padding, a causal or window
// pattern handed over as a mask (transformers builds one whenever a batch is padded), a
// block-sparse mask: those tiles' products and exps were computed and then masked.
// The same results: a dropped key's weight is exactly 0, so it adds nothing to a row's sum or
// output (a step never reads V past its cols); the same bits but for two corners a reviewer
// found: an output that underflowed to -0 stays -0 (adding 0 * v made it +0), and the
// vdpbf16ps step with inf or NaN in V past the kept keys takes its fast P.V, which rounds
// differently (within the same bound).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/kernel.h"
#include "types.h"

namespace cpuattn {

// Whether the mask keeps key c of a row (its element at c * stride): a bool element not 0,
// an additive one not -inf (NaN keeps the key: the row's output becomes NaN).
template <typename T>
inline bool mask_keeps(MaskKind kind, const void* row, int64_t c, int64_t stride) {
  if (kind == MaskKind::Bool) return static_cast<const uint8_t*>(row)[c * stride] != 0;
  return !(static_cast<const T*>(row)[c * stride] == -std::numeric_limits<T>::infinity());
}

// One past the last of keys [j0 + from, j0 + to) that a row keeps, or `from` if none: from
// the end down, 8 bool elements a word where they are contiguous.
template <typename T>
inline int64_t row_kept_end(MaskKind kind, const void* row, int64_t j0, int64_t from, int64_t to,
                            int64_t stride) {
  int64_t c = to;
  if (kind == MaskKind::Bool && stride == 1) {
    const uint8_t* bytes = static_cast<const uint8_t*>(row) + j0;
    for (; c - 8 >= from; c -= 8) {
      uint64_t word;
      std::memcpy(&word, bytes + c - 8, 8);
      if (word != 0) break;  // a kept key among these 8: found one at a time below
    }
  }
  const char* base = static_cast<const char*>(row) +
                     j0 * stride * int64_t(kind == MaskKind::Bool ? sizeof(uint8_t) : sizeof(T));
  for (; c > from; --c) {
    if (mask_keeps<T>(kind, base, c - 1, stride)) return c;
  }
  return from;
}

// One past the last key of the step's tile [j0, j0 + cols) that one of its rows keeps by the
// mask: cols when the last one is kept (the common case: one element read), 0 when none is.
// Rows that share a mask row (a mask broadcast over rows or heads) are read once.
template <typename T>
inline int64_t mask_kept_cols(const TileStep<T>& s) {
  if (s.mask_kind == MaskKind::None) return s.cols;
  int64_t end = 0;
  const void* previous = nullptr;
  for (int64_t r = 0; r < s.rows && end < s.cols; ++r) {
    if (s.mask_rows[r] == previous) continue;
    previous = s.mask_rows[r];
    end = row_kept_end<T>(s.mask_kind, previous, s.j0, end, s.cols, s.mask_col_stride);
  }
  return end;
}

}  // namespace cpuattn
