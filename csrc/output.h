// Where finished rows go: out and lse, or a split-KV partial result, and the merge of an
// item's partial results.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention.h"
#include "convert.h"
#include "kernels/kernel.h"
#include "plan.h"
#include "query_stage.h"

namespace cpuattn {

template <typename T>
class OutputWriter {
 public:
  OutputWriter(const Params& p, const KernelSet& kernels, const WorkPlan& plan)
      : p_(p), group_(plan.group()), partial_elems_(plan.max_tile_rows() * (p.dv + 2)) {
    if constexpr (std::is_same_v<T, float>) {
      finish_ = kernels.finish_f32;
      if (!p.sinks.data && (p.out_dtype == DType::F16 || p.out_dtype == DType::BF16)) {
        half_out_ =
            kernels.encodings[int(p.out_dtype == DType::F16 ? Elem::F16 : Elem::Bf16)].from_float;
      }
    } else {
      finish_ = kernels.finish_f64;
    }
  }

  // Elements of one partial result: per row m, l, then o (Dv).
  int64_t partial_elems() const { return partial_elems_; }

  // The tile's rows to out (and lse): an out in the compute type is written by the kernel's
  // finish along with the row sums, a half out by the kernel's rounding from those sums, and
  // any other (with sinks) here.
  void write_rows(const ItemPos& pos, QueryRows<T>& t) const {
    const int64_t rows = pos.rows;
    const OutBase base = out_base(pos);
    const bool direct = p_.out_dtype == p_.compute_dtype && !p_.sinks.data;
    if (direct) {
      T* out = static_cast<T*>(const_cast<void*>(p_.out.data)) + base.out;
      const size_t nb = p_.batch_shape.size();
      const int64_t head_stride = p_.out.strides[nb], pos_stride = p_.out.strides[nb + 1];
      for (int64_t r = 0; r < rows; ++r) {
        t.out[r] = out + t.head[r] * head_stride + t.pos[r] * pos_stride;
      }
    }
    finish_(t.o.data(), t.l.data(), rows, p_.dv, direct ? t.out.data() : nullptr, t.sums.data());
    if constexpr (std::is_same_v<T, float>) {
      if (half_out_) {  // the rows times 1 / sum (finish_row's factor without sinks), rounded
        uint16_t* out = static_cast<uint16_t*>(const_cast<void*>(p_.out.data)) + base.out;
        const size_t nb = p_.batch_shape.size();
        const int64_t head_stride = p_.out.strides[nb], pos_stride = p_.out.strides[nb + 1];
        for (int64_t r = 0; r < rows; ++r) {
          const float inv = t.sums[r] == 0.0f ? 0.0f : 1.0f / t.sums[r];
          half_out_(t.o.data() + r * p_.dv, inv, p_.dv,
                    out + t.head[r] * head_stride + t.pos[r] * pos_stride);
        }
      }
    }
    if ((direct || half_out_) && !p_.lse.data) return;
    for (int64_t r = 0; r < rows; ++r) {
      const Finish f = finish_row(base, t.head[r], t.m[r], t.sums[r]);
      if (!direct && !half_out_) {
        write_out_row(base, t.pos[r], t.head[r], t.o.data() + r * p_.dv, f.inv);
      }
      write_lse(base, t.pos[r], t.head[r], f.lse);
    }
  }

  // The tile's unnormalized state (per row m, l, o) to `partial`, for merge.
  void write_partial(const ItemPos& pos, QueryRows<T>& t, T* partial) const {
    finish_(t.o.data(), t.l.data(), pos.rows, p_.dv, nullptr, t.sums.data());
    for (int64_t r = 0; r < pos.rows; ++r) {
      T* dst = partial + r * (p_.dv + 2);
      dst[0] = t.m[r];
      dst[1] = t.sums[r];
      std::copy(t.o.data() + r * p_.dv, t.o.data() + (r + 1) * p_.dv, dst + 2);
    }
  }

  // Combines an item's chunk results (write_partial, partial_elems() apart), in chunk order,
  // into out and lse: the arithmetic of cpuattn.merge. A chunk with no kept key, or whose
  // weight rounds to exactly 0, contributes nothing. acc: Dv elements of scratch.
  void merge(const ItemPos& pos, const T* partials, int64_t chunks, T* acc) const {
    const int64_t stride = partial_elems_, dv = p_.dv;
    const OutBase base = out_base(pos);
    for (int64_t r = 0; r < pos.rows; ++r) {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < chunks; ++c) {
        const T* part = partials + c * stride + r * (dv + 2);
        if (part[1] != T(0) && part[0] > m) m = part[0];
      }
      T l = 0;
      std::fill(acc, acc + dv, T(0));
      for (int64_t c = 0; c < chunks; ++c) {
        const T* part = partials + c * stride + r * (dv + 2);
        if (part[1] == T(0)) continue;
        const T w = std::exp(part[0] - m);
        if (w == T(0) && part[1] == part[1]) continue;  // a NaN sum still makes the row NaN
        l += part[1] * w;
        for (int64_t e = 0; e < dv; ++e) acc[e] += part[2 + e] * w;
      }
      const int64_t i = (pos.r0 + r) / group_, h = pos.hk * group_ + (pos.r0 + r) % group_;
      const Finish f = finish_row(base, h, m, l);
      write_out_row(base, i, h, acc, f.inv);
      write_lse(base, i, h, f.lse);
    }
  }

 private:
  // Element offsets of an item's batch entry (and first row, for packed sequences) in out
  // and lse (lse: -1 when not requested), computed once per work item rather than per row.
  struct OutBase {
    int64_t out, lse, sinks;  // sinks: -1 without them
  };
  OutBase out_base(const ItemPos& pos) const {
    const size_t nb = p_.batch_shape.size();
    return {batch_offset(p_.batch_shape, p_.out, pos.b) + pos.q_row * p_.out.strides[nb + 1],
            p_.lse.data
                ? batch_offset(p_.batch_shape, p_.lse, pos.b) + pos.q_row * p_.lse.strides[nb + 1]
                : -1,
            p_.sinks.data ? batch_offset(p_.batch_shape, p_.sinks, pos.b) : -1};
  }

  // A finished row of head h (running max m, sum l): the factor its o is multiplied by, and
  // its lse. 1 / l and a = m + log l; with a sink logit in the denominator, e^(a - lse) / l and
  // lse = log(e^a + e^sink), computed from the larger of the two so that neither overflows. A
  // row that kept no key: 0, and -inf or the sink. NaN stays NaN.
  struct Finish {
    T inv, lse;
  };
  Finish finish_row(const OutBase& at, int64_t h, T m, T l) const {
    const T* sink = nullptr;
    if (at.sinks >= 0) {
      sink = static_cast<const T*>(p_.sinks.data) + at.sinks +
             h * p_.sinks.strides[p_.batch_shape.size()];
    }
    if (l == T(0)) return {T(0), sink ? *sink : -std::numeric_limits<T>::infinity()};
    if (!sink && !p_.lse.data) return {T(1) / l, T(0)};  // no lse to write: no log
    const T a = m + std::log(l);
    if (!sink) return {T(1) / l, a};
    const T hi = a < *sink ? *sink : a, lo = a < *sink ? a : *sink;
    const T lse = hi + std::log1p(std::exp(lo - hi));
    return {std::exp(a - lse) / l, lse};
  }

  // out = o x inv (finish_row) for query i of head h, in out's type.
  void write_out_row(const OutBase& at, int64_t i, int64_t h, const T* o, T inv) const {
    void* out = const_cast<void*>(p_.out.data);
    const size_t nb = p_.batch_shape.size();
    const int64_t base = at.out + h * p_.out.strides[nb] + i * p_.out.strides[nb + 1];
    if (p_.out_dtype == p_.compute_dtype) {
      for (int64_t e = 0; e < p_.dv; ++e) static_cast<T*>(out)[base + e] = o[e] * inv;
    } else if (p_.out_dtype == DType::BF16) {  // one loop per type: no type test per element
      uint16_t* dst = static_cast<uint16_t*>(out) + base;
      for (int64_t e = 0; e < p_.dv; ++e) dst[e] = f32_to_bf16(float(o[e] * inv));
    } else {
      for (int64_t e = 0; e < p_.dv; ++e) store_as<T>(out, p_.out_dtype, base + e, o[e] * inv);
    }
  }

  // The row's lse (finish_row), when asked for.
  void write_lse(const OutBase& at, int64_t i, int64_t h, T value) const {
    if (!p_.lse.data) return;
    const size_t nb = p_.batch_shape.size();
    T* lse = static_cast<T*>(const_cast<void*>(p_.lse.data)) + at.lse;
    lse[h * p_.lse.strides[nb] + i * p_.lse.strides[nb + 1]] = value;
  }

  const Params& p_;
  int64_t group_, partial_elems_;
  void (*finish_)(const T*, const T*, int64_t, int64_t, T* const*, T*);  // the ISA's finish
  // The ISA's rounding of rows to a float16 / bfloat16 out (float32 compute, no sinks), or
  // nullptr: written element by element here, that rounding took a tenth of a small-head
  // call's time.
  decltype(EncodingOps::from_float) half_out_ = nullptr;
};

}  // namespace cpuattn
