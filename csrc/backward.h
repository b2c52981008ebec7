// The backward pass's contract: the forward's Params (q, k, v, lse and the options), the
// upstream gradient, and where the gradients go. Knows nothing about Python.
#pragma once
#include "attention.h"

namespace cpuattn {

struct BackwardParams {
  // q, k, v in the compute type (the binding converts half inputs), lse, mask, kv_lengths,
  // ALiBi and the scalar options as for attention(); out, additive_w and cu_seqlens unused.
  Params fwd;
  View dout;   // (*batch, Hq, Lq, Dv), compute type, unit stride on the last axis
  View delta;  // (*batch, Hq, Lq), compute type: rowsum(dout * out), any strides
  View dq;  // (*batch, Hq, Lq, D), dq_dtype, unit last stride, writable: every row written
  // (*batch, Hkv, Lk, D | Dv), dk_dtype / dv_dtype, unit last stride, writable: every row written
  // (0 for keys no query keeps).
  View dk, dv;
  // The gradients' dtypes: the compute type, or with float32 compute float16 / bfloat16,
  // each element the float32 result rounded once (convert.h: to nearest even).
  DType dq_dtype = DType::F32, dk_dtype = DType::F32, dv_dtype = DType::F32;
  // q, k, v and dout hold bfloat16 values (float32 converted from bfloat16): their products
  // may then run as bfloat16 products (AMX, AVX512-BF16) exactly, with float32 sums (checked).
  bool bf16_inputs = false;
};

// FlashAttention-2's backward (backward.cpp): the gradients of attention(p.fwd) for upstream
// p.dout. Bitwise identical for any thread count. Thread-safe, no GIL needed.
void attention_backward(const BackwardParams& p);

}  // namespace cpuattn
