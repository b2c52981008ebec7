// Where the K and V rows of a key live: a K/V layout, used by every K/V source (kv_source.h)
// to find a key tile's rows, so that how rows are stored in memory and how they become what
// the step multiplies (the source's encoding) are independent.
//
// A layout has:
//   Head head(const ItemPos&)             the item's (batch entry, kv head), once per item
//   const void* k_row(Head, j), v_row     K / V row of key j of that head
//   int64_t k_ld(), v_ld()                elements between a key tile's consecutive rows
//   bool rows_inside(Head, j0, n)         keys [j0, j0 + n) of the head all lie in K's memory
// A key tile's rows are one run k_ld() (v_ld()) elements apart. A layout whose rows lie in
// blocks (paged caches) keeps that when a block holds whole key tiles (kTileKeys divides the
// block size); smaller blocks need a source that gathers a tile's rows first.
#pragma once
#include <cstdint>

#include "attention.h"
#include "plan.h"

namespace cpuattn {

// K (*batch, Hkv, Lk, D) and V (*batch, Hkv, Lk, Dv), any strides, the last axis unit-stride;
// packed varlen sequences start at their first row (ItemPos::k_row).
class DenseLayout {
 public:
  // Element offsets of the head's key 0 in K and V, and its keys (rows [0, keys) of K and V).
  struct Head {
    int64_t k, v, keys;
  };

  explicit DenseLayout(const Params& p)
      : k_(static_cast<const char*>(p.k.data)), v_(static_cast<const char*>(p.v.data)),
        batch_shape_(p.batch_shape), k_view_(p.k), v_view_(p.v),
        elem_(p.kv_dtype == DType::F64   ? 8
              : p.kv_dtype == DType::F32 ? 4
                                         : 2) {
    const size_t nb = p.batch_shape.size();
    k_head_ = p.k.strides[nb];
    k_ld_ = p.k.strides[nb + 1];
    v_head_ = p.v.strides[nb];
    v_ld_ = p.v.strides[nb + 1];
  }

  Head head(const ItemPos& pos) const {
    return {batch_offset(batch_shape_, k_view_, pos.b) + pos.hk * k_head_ + pos.k_row * k_ld_,
            batch_offset(batch_shape_, v_view_, pos.b) + pos.hk * v_head_ + pos.k_row * v_ld_,
            pos.lk};
  }
  const void* k_row(const Head& h, int64_t j) const { return k_ + (h.k + j * k_ld_) * elem_; }
  const void* v_row(const Head& h, int64_t j) const { return v_ + (h.v + j * v_ld_) * elem_; }
  int64_t k_ld() const { return k_ld_; }
  int64_t v_ld() const { return v_ld_; }
  bool rows_inside(const Head& h, int64_t j0, int64_t n) const { return j0 + n <= h.keys; }

 private:
  const char* k_;
  const char* v_;
  const std::vector<int64_t>& batch_shape_;
  const View& k_view_;
  const View& v_view_;
  int64_t elem_;  // bytes per element of K and V
  int64_t k_head_ = 0, k_ld_ = 0, v_head_ = 0, v_ld_ = 0;
};

}  // namespace cpuattn
