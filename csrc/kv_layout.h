// Where the K and V rows of a key live: a K/V layout, used by every K/V source (kv_source.h)
// to find a key tile's rows, so that how rows are stored in memory and how they become what
// the step multiplies (the source's encoding) are independent.
//
// A layout has:
//   Head head(const ItemPos&)             the item's (batch entry, kv head), once per item
//   const void* k_row(Head, j), v_row     K / V row of key j of that head
//   const float* k_scale(Head, j), v_scale  its scale (int8 K and V only)
//   int64_t k_ld(), v_ld()                elements between consecutive rows of one run
//   int64_t k_scale_ld(), v_scale_ld()    the same for the scales
//   int64_t run_end(j)                    the first key past key j's run
//   int64_t k_offset(Head), v_offset(Head)  bytes from the rows of the batch entry's kv head 0
//                                         to this head's: the same for every key, so one row
//                                         table serves all kv heads of a batch entry
//   const void* runs(Head)                with a key range and kv head 0's first row, what
//                                         tells which rows a table holds (a block table's row)
//   static constexpr bool kOneRun         every head's keys are one run (run_end is never hit)
//   bool rows_inside(Head, j0, n)         keys [j0, j0 + n) lie in K's memory as one run,
//                                         for j0 below the valid keys (the AMX step reads
//                                         whole tiles)
// Keys lie in runs: inside a run, key j + 1's row is k_ld() (v_ld()) elements after key j's.
// A dense array is one run per head; a paged cache one run per block. Sources read a key
// tile's rows in place when they lie in one run, and otherwise run by run (kv_source.h).
#pragma once
#include <cstdint>
#include <limits>

#include "attention.h"
#include "plan.h"

namespace cpuattn {

// What both layouts keep: the base pointers and element size of K, V and their scales.
class LayoutBase {
 protected:
  explicit LayoutBase(const Params& p)
      : k_(static_cast<const char*>(p.k.data)), v_(static_cast<const char*>(p.v.data)),
        k_scale_(static_cast<const float*>(p.k_scale.data)),
        v_scale_(static_cast<const float*>(p.v_scale.data)), elem_(dtype_bytes(p.kv_dtype)) {}

  const char* k_;
  const char* v_;
  const float* k_scale_;  // nullptr unless int8
  const float* v_scale_;
  int64_t elem_;
};

// K (*batch, Hkv, Lk, D) and V (*batch, Hkv, Lk, Dv), any strides, the last axis unit-stride;
// packed varlen sequences start at their first row (ItemPos::k_row).
class DenseLayout : LayoutBase {
 public:
  // Element offsets of the head's key 0 in K, V and their scales, and its keys (rows [0,
  // keys) of K and V).
  struct Head {
    int64_t k, v, ks, vs, keys;
    int64_t k_head, v_head;  // kv head times its stride, in K and in V
  };
  static constexpr bool kOneRun = true;

  explicit DenseLayout(const Params& p) : LayoutBase(p), batch_shape_(p.batch_shape), p_(p) {
    const size_t nb = p.batch_shape.size();
    k_head_ = p.k.strides[nb];
    k_ld_ = p.k.strides[nb + 1];
    v_head_ = p.v.strides[nb];
    v_ld_ = p.v.strides[nb + 1];
    if (k_scale_) {
      ks_head_ = p.k_scale.strides[nb];
      ks_ld_ = p.k_scale.strides[nb + 1];
      vs_head_ = p.v_scale.strides[nb];
      vs_ld_ = p.v_scale.strides[nb + 1];
    }
  }

  Head head(const ItemPos& pos) const {
    const auto at = [&](const View& view, int64_t head, int64_t ld) {
      return batch_offset(batch_shape_, view, pos.b) + pos.hk * head + pos.k_row * ld;
    };
    Head h{at(p_.k, k_head_, k_ld_), at(p_.v, v_head_, v_ld_), 0, 0, pos.lk,
           pos.hk * k_head_,         pos.hk * v_head_};
    if (k_scale_) {
      h.ks = at(p_.k_scale, ks_head_, ks_ld_);
      h.vs = at(p_.v_scale, vs_head_, vs_ld_);
    }
    return h;
  }
  const void* k_row(const Head& h, int64_t j) const { return k_ + (h.k + j * k_ld_) * elem_; }
  const void* v_row(const Head& h, int64_t j) const { return v_ + (h.v + j * v_ld_) * elem_; }
  const float* k_scale(const Head& h, int64_t j) const { return k_scale_ + h.ks + j * ks_ld_; }
  const float* v_scale(const Head& h, int64_t j) const { return v_scale_ + h.vs + j * vs_ld_; }
  int64_t k_ld() const { return k_ld_; }
  int64_t v_ld() const { return v_ld_; }
  int64_t k_scale_ld() const { return ks_ld_; }
  int64_t v_scale_ld() const { return vs_ld_; }
  int64_t run_end(int64_t) const { return std::numeric_limits<int64_t>::max(); }
  int64_t k_offset(const Head& h) const { return h.k_head * elem_; }
  int64_t v_offset(const Head& h) const { return h.v_head * elem_; }
  const void* runs(const Head&) const { return nullptr; }  // one run: its first row says all
  // Keys [j0, j0 + n) of the head all lie in K's memory (the AMX step reads whole tiles).
  bool rows_inside(const Head& h, int64_t j0, int64_t n) const { return j0 + n <= h.keys; }

 private:
  const std::vector<int64_t>& batch_shape_;
  const Params& p_;
  int64_t k_head_ = 0, k_ld_ = 0, v_head_ = 0, v_ld_ = 0;
  int64_t ks_head_ = 0, ks_ld_ = 0, vs_head_ = 0, vs_ld_ = 0;
};

// Paged caches (Params::paged): key j of batch entry b is row j % block_size of block
// block_table[b][j / block_size]; each block is one run.
class PagedLayout : LayoutBase {
 public:
  // The head's element offsets inside a block (K, V, scales) and its row of the block table.
  struct Head {
    int64_t k, v, ks, vs;
    const int32_t* blocks;
  };
  static constexpr bool kOneRun = false;

  explicit PagedLayout(const Params& p)
      : LayoutBase(p), table_(p.paged.block_table), table_ld_(p.paged.table_ld),
        block_size_(p.paged.block_size), k_block_(p.k.strides[0]), k_ld_(p.k.strides[1]),
        k_head_(p.k.strides[2]), v_block_(p.v.strides[0]), v_ld_(p.v.strides[1]),
        v_head_(p.v.strides[2]) {
    if (k_scale_) {
      ks_block_ = p.k_scale.strides[0];
      ks_ld_ = p.k_scale.strides[1];
      ks_head_ = p.k_scale.strides[2];
      vs_block_ = p.v_scale.strides[0];
      vs_ld_ = p.v_scale.strides[1];
      vs_head_ = p.v_scale.strides[2];
    }
  }

  Head head(const ItemPos& pos) const {
    return {pos.hk * k_head_, pos.hk * v_head_, pos.hk * ks_head_, pos.hk * vs_head_,
            table_ + pos.b * table_ld_};
  }
  const void* k_row(const Head& h, int64_t j) const {
    return k_ + (at(h, j, k_block_, k_ld_) + h.k) * elem_;
  }
  const void* v_row(const Head& h, int64_t j) const {
    return v_ + (at(h, j, v_block_, v_ld_) + h.v) * elem_;
  }
  const float* k_scale(const Head& h, int64_t j) const {
    return k_scale_ + at(h, j, ks_block_, ks_ld_) + h.ks;
  }
  const float* v_scale(const Head& h, int64_t j) const {
    return v_scale_ + at(h, j, vs_block_, vs_ld_) + h.vs;
  }
  int64_t k_ld() const { return k_ld_; }
  int64_t v_ld() const { return v_ld_; }
  int64_t k_scale_ld() const { return ks_ld_; }
  int64_t v_scale_ld() const { return vs_ld_; }
  int64_t run_end(int64_t j) const { return (j / block_size_ + 1) * block_size_; }
  int64_t k_offset(const Head& h) const { return h.k * elem_; }
  int64_t v_offset(const Head& h) const { return h.v * elem_; }
  const void* runs(const Head& h) const { return h.blocks; }
  bool rows_inside(const Head&, int64_t j0, int64_t n) const {
    return j0 % block_size_ + n <= block_size_;
  }

 private:
  // Element offset of key j's row (block and row inside it) for these strides.
  int64_t at(const Head& h, int64_t j, int64_t block_stride, int64_t row_stride) const {
    return int64_t(h.blocks[j / block_size_]) * block_stride + (j % block_size_) * row_stride;
  }

  const int32_t* table_;
  int64_t table_ld_, block_size_;
  int64_t k_block_, k_ld_, k_head_, v_block_, v_ld_, v_head_;
  int64_t ks_block_ = 0, ks_ld_ = 0, ks_head_ = 0, vs_block_ = 0, vs_ld_ = 0, vs_head_ = 0;
};

}  // namespace cpuattn
