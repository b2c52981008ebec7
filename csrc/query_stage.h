// A query tile's rows: which (position, head) each one is, the keys it may see, its q as the
// step reads it, and its running softmax state; staged once per work item.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "aligned_buffer.h"
#include "attention.h"
#include "convert.h"
#include "kernels/kernel.h"
#include "mask.h"
#include "plan.h"
#include "tiles.h"

namespace cpuattn {

// One thread's rows of the tile in flight. Uninitialized (AlignedBuffer): stage() writes what
// the step reads.
template <typename T>
struct QueryRows {
  AlignedBuffer<T> q, s, o, m, l, sums;  // staged q, scores, running output, max and sums
  AlignedBuffer<uint32_t> q_hi, q_lo;    // q as bfloat16 pairs (bfloat16 steps only)
  AlignedBuffer<int64_t> pos, head, diag, caps;  // caps: with global tokens only
  AlignedBuffer<KeyRange> bounds;
  AlignedBuffer<const void*> mask_rows;
  AlignedBuffer<T> slopes;
  AlignedBuffer<T*> out;  // per row: where its output goes, when out has the compute type
  int64_t q_first = 0;    // element offset of the tile's first q row
  bool s_written = false;  // s zeroed (stage(), on the thread's first tile)

  // pairs: q's bfloat16 pairs per row (padded as the step needs), or -1: q is not staged as
  // pairs. n: room for this many rows, a multiple of kStepRowBlock (or kTileRows).
  QueryRows(int64_t d, int64_t dv, int64_t pairs, int64_t n = kTileRows)
      : q(n * d), s(n * kTileKeys), o(n * dv), m(n), l(n * kSumSlots), sums(n), pos(n), head(n),
        diag(n), caps(n), bounds(n), mask_rows(n), slopes(n), out(n) {
    if (pairs >= 0) {
      q_hi.allocate(n * pairs);
      q_lo.allocate(n * pairs);
    }
  }

  // The room for tiles of at most `rows` rows.
  static int64_t room(int64_t rows) {
    return std::min(kTileRows, (rows + kStepRowBlock - 1) / kStepRowBlock * kStepRowBlock);
  }
};

// x = hi + lo as two bfloat16 (hi rounded to nearest, lo the rounding error rounded): 16 of
// float32's 24 significant bits, so bfloat16 dot products with a float32 q lose ~2^-17 of
// each product. A finite x never gets an infinite hi; a non-finite x has lo = 0.
inline void split_bf16(float x, uint32_t& hi, uint32_t& lo) {
  uint16_t h = f32_to_bf16(x);
  if (std::isfinite(x) && !std::isfinite(bf16_to_f32(h))) h = uint16_t(f32_to_bits(x) >> 16);
  hi = h;
  lo = std::isfinite(x) ? f32_to_bf16(x - bf16_to_f32(h)) : 0;
}

// A step's fields that hold for a whole call (the forward's and the backward's): head dims,
// the score scale, the mask's kind and key stride, softcap, additive weights.
template <typename T>
TileStep<T> call_step(const Params& p) {
  TileStep<T> s{};
  const size_t nb = p.batch_shape.size();
  s.d = p.d;
  s.dv = p.dv;
  s.dot_scale = static_cast<T>(p.scale);
  s.mask_kind = p.mask_kind;
  s.mask_col_stride = p.mask.data ? p.mask.strides[nb + 2] : 0;
  s.softcap = static_cast<T>(p.softcap);
  s.additive_w = static_cast<const T*>(p.additive_w);
  return s;
}

template <typename T>
class QueryStage {
 public:
  // pairs: q's bfloat16 pairs per row for the bfloat16 steps, or -1 (q in the compute type).
  // staged_query: the K/V source's step reads q staged, never in place (kv_source.h).
  // scaled_copy: a staged copy of q is times the scale (else as it is, and the steps scale
  // the scores by dot_scale, as for q in place).
  QueryStage(const Params& p, const KernelSet& kernels, const WorkPlan& plan, int64_t pairs,
             bool staged_query, bool scaled_copy = true)
      : p_(p), group_(plan.group()), q_pairs_(pairs) {
    if constexpr (std::is_same_v<T, float>) {
      scale_ = kernels.scale_f32;
    } else {
      scale_ = kernels.scale_f64;
    }
    // The step reads q rows in place (and scales the scores) when a tile's rows are a
    // constant stride apart in the compute type: no copy-and-scale per row.
    const size_t nb = p.batch_shape.size();
    const int64_t head_stride = p.q.strides[nb], pos_stride = p.q.strides[nb + 1];
    if (pairs < 0) {
      if (group_ == 1) {
        q_ld_ = pos_stride;
      } else if (plan.rows_per_head_group() <= group_ || pos_stride == group_ * head_stride) {
        q_ld_ = head_stride;
      }
    }
    in_place_ = q_ld_ != 0 && p.q_dtype == p.compute_dtype && !staged_query && !p.additive_w;
    unscaled_ = in_place_ || !scaled_copy;
  }

  // Rows [pos.r0, pos.r0 + pos.rows) of the item: their positions, heads, keys and diagonal,
  // mask rows and ALiBi slopes, q (copied times the scale, unless read in place), and, with
  // reset_state (the forward's online softmax; not the backward), the running state reset.
  void stage(const ItemPos& pos, const RowBounds& rb, QueryRows<T>& t,
             bool reset_state = true) const {
    if (!t.s_written) {
      // The one buffer read where no step wrote: the AMX epilogue works on whole tile rows,
      // the others on whole vectors past cols, and the in-place score paths write only the
      // columns of their keys (mask_rows then sets the rest to -inf); the vdpbf16ps step's
      // round_weights converts whole 32-column chunks. Zeroed once, here, by the thread that
      // uses it: never an uninitialized read.
      std::fill(t.s.data(), t.s.data() + t.s.size(), T(0));
      t.s_written = true;
    }
    const int64_t b = pos.b, hk = pos.hk, rows = pos.rows;
    const size_t nb = p_.batch_shape.size();
    const int64_t q_base = batch_offset(p_.batch_shape, p_.q, b) + pos.q_row * p_.q.strides[nb + 1];
    const T scale = unscaled_ ? T(1) : static_cast<T>(p_.scale);
    // Row r0 + r is query i of head hk * group + g, stepped without a division per row.
    // Locals throughout: the compiler cannot keep p_'s fields in registers across the stores.
    int64_t* row_pos = t.pos.data();
    int64_t* row_head = t.head.data();
    int64_t i = pos.r0 / group_, g = pos.r0 % group_;
    const int64_t group = group_;
    for (int64_t r = 0; r < rows; ++r, g = g + 1 == group ? 0 : g + 1, i += g == 0) {
      row_pos[r] = i;
      row_head[r] = hk * group + g;
      t.bounds[r] = rb.keys_of_row(i);
      t.diag[r] = i + rb.offset;
      if (rb.globals.n > 0) t.caps[r] = rb.cap(i);
      t.m[r] = -std::numeric_limits<T>::infinity();
    }
    const int64_t q_head_stride = p_.q.strides[nb], q_pos_stride = p_.q.strides[nb + 1];
    t.q_first = q_base + row_head[0] * q_head_stride + row_pos[0] * q_pos_stride;
    if (!in_place_) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t src = q_base + row_head[r] * q_head_stride + row_pos[r] * q_pos_stride;
        if (q_pairs_ >= 0) {
          stage_pairs(src, r, t);
        } else if (p_.q_dtype == p_.compute_dtype) {
          scale_(static_cast<const T*>(p_.q.data) + src, scale, p_.d, t.q.data() + r * p_.d);
        } else {
          T* dst = t.q.data() + r * p_.d;
          for (int64_t e = 0; e < p_.d; ++e) {
            dst[e] = load_as<T>(p_.q.data, p_.q_dtype, src + e) * scale;
          }
        }
      }
    }
    if (p_.alibi.data) {
      const T* slopes =
          static_cast<const T*>(p_.alibi.data) + batch_offset(p_.batch_shape, p_.alibi, b);
      for (int64_t r = 0; r < rows; ++r) t.slopes[r] = slopes[row_head[r] * p_.alibi.strides[nb]];
    }
    if (p_.mask.data) {
      const int64_t mask_base = batch_offset(p_.batch_shape, p_.mask, b);
      const int64_t item = p_.mask_kind == MaskKind::Bool ? 1 : sizeof(T);
      const char* mask = static_cast<const char*>(p_.mask.data) + mask_base * item;
      const int64_t head_stride = p_.mask.strides[nb], pos_stride = p_.mask.strides[nb + 1];
      for (int64_t r = 0; r < rows; ++r) {
        t.mask_rows[r] = mask + (row_head[r] * head_stride + row_pos[r] * pos_stride) * item;
      }
    }
    if (!reset_state) return;
    std::fill(t.l.data(), t.l.data() + rows * kSumSlots, T(0));
    std::fill(t.o.data(), t.o.data() + rows * p_.dv, T(0));
  }

  // Whether steps read q unscaled, in place or copied (they scale the scores by dot_scale).
  bool unscaled() const { return unscaled_; }

  // Rows [r0, r1) of a step that point() set up, as a step of their own (the rest of the tile
  // untouched). r0 a multiple of kStepRowBlock, so every step may still round its rows up.
  TileStep<T> rows_of(const TileStep<T>& s, int64_t r0, int64_t r1) const {
    TileStep<T> part = s;
    part.rows = r1 - r0;
    part.q = s.q + r0 * s.q_ld;
    part.s = s.s + r0 * kTileKeys;
    part.o = s.o + r0 * p_.dv;
    part.m = s.m + r0;
    part.l = s.l + r0 * kSumSlots;
    part.slopes = s.slopes ? s.slopes + r0 : nullptr;
    part.diag = s.diag + r0;
    part.bounds = s.bounds + r0;
    part.caps = s.caps + r0;
    part.mask_rows = s.mask_rows + r0;
    if (s.q_hi) part.q_hi = s.q_hi + r0 * s.d_pairs;
    if (s.q_lo) part.q_lo = s.q_lo + r0 * s.d_pairs;
    return part;
  }

  // The step's q and per-row fields, pointing into the thread's rows.
  void point(TileStep<T>& s, QueryRows<T>& t, int64_t rows) const {
    s.q = in_place_ ? static_cast<const T*>(p_.q.data) + t.q_first : t.q.data();
    s.q_ld = in_place_ ? q_ld_ : p_.d;
    s.q_unscaled = unscaled_;
    s.rows = rows;
    s.s = t.s.data();
    s.o = t.o.data();
    s.m = t.m.data();
    s.l = t.l.data();
    s.bounds = t.bounds.data();
    s.caps = t.caps.data();
    s.global_cols = 0;
    s.mask_rows = t.mask_rows.data();
    s.slopes = p_.alibi.data ? t.slopes.data() : nullptr;
    s.diag = t.diag.data();
    if (q_pairs_ >= 0) {
      s.q_hi = t.q_hi.data();
      s.q_lo = p_.q_dtype == DType::BF16 ? nullptr : t.q_lo.data();
    }
  }

 private:
  // Query row `r` as bfloat16 pairs, unscaled (the step scales the scores): a bfloat16 q as
  // it is, another q split into hi + lo (split_bf16); zero pairs past D.
  void stage_pairs(int64_t src, int64_t r, QueryRows<T>& t) const {
    if (q_pairs_ == 0) return;  // D = 0: no pairs, and no buffer to copy into (memcpy to null)
    uint32_t* hi = t.q_hi.data() + r * q_pairs_;
    uint32_t* lo = t.q_lo.data() + r * q_pairs_;
    std::fill(hi + p_.d / 2, hi + q_pairs_, 0u);
    std::fill(lo + p_.d / 2, lo + q_pairs_, 0u);
    // A pair of consecutive bfloat16 is their 4 bytes in memory (little-endian, as x86).
    if (p_.q_dtype == DType::BF16) {
      std::memcpy(hi, static_cast<const uint16_t*>(p_.q.data) + src, p_.d * sizeof(uint16_t));
      return;
    }
    for (int64_t e = 0; e < p_.d; ++e) {
      uint32_t h, l;
      split_bf16(load_as<float>(p_.q.data, p_.q_dtype, src + e), h, l);
      const int shift = e % 2 ? 16 : 0;
      hi[e / 2] = (e % 2 ? hi[e / 2] : 0) | h << shift;
      lo[e / 2] = (e % 2 ? lo[e / 2] : 0) | l << shift;
    }
  }

  const Params& p_;
  int64_t group_, q_pairs_;
  int64_t q_ld_ = 0;  // with in_place_: elements between a tile's q rows (0 = not constant)
  bool in_place_ = false;
  bool unscaled_ = false;  // in place, or copied without the scale
  void (*scale_)(const T*, T, int64_t, T*);  // the ISA's y = x * a, for q rows
};

}  // namespace cpuattn
