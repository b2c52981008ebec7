// The driver's contract: validated views in, attention out. Knows nothing about Python.
#pragma once
#include <cstdint>
#include <vector>

#include "types.h"  // DType, MaskKind, Align

namespace cpuattn {

// A strided view. Strides are in elements and may be zero or negative; the binding has
// checked that every index inside `shape` lands in the owning buffer.
struct View {
  const void* data = nullptr;
  std::vector<int64_t> strides;  // batch dims..., then the trailing dims of the operand
};

// Bounds on |Params::diagonal| and on Lq and Lk (longer axes exist only as zero-stride
// views): with the window sides bounded by Lq + Lk + |diagonal| (the binding), i + diagonal
// -+ a side + 1 stays below 2 x 2^61 + 3 x 2^60 + 1 < 2^63, inside int64.
constexpr int64_t kMaxDiagonal = int64_t(1) << 61;
constexpr int64_t kMaxLength = int64_t(1) << 60;

// K and V in blocks of `block_size` keys (flash-attn's and vLLM's paged layout): k and v are
// (num_blocks, block_size, Hkv, D|Dv) caches, their views' strides [block, row, kv head, 1]
// (k_scale, v_scale: [block, row, kv head]); key j of batch entry b is row j % block_size of
// block block_table[b * table_ld + j / block_size]. batch_shape is {B}; lk = table_ld x
// block_size (packed queries: cu_seqlens_k's total, offsets that stand for kv_lengths; the
// layout reads only their differences); kv_lengths (or cu_seqlens_k's differences) bound the
// keys read: the binding has checked that the entries they reach name blocks of the cache.
struct PagedKv {
  bool on = false;
  const int32_t* block_table = nullptr;  // may be nullptr when table_ld is 0 (nothing read)
  int64_t table_ld = 0, block_size = 0;
};

struct Params {
  DType compute_dtype = DType::F32;  // F32 or F64; also lse's and a float mask's
  // Storage types: the compute type, or F16 / BF16 (computed in F32; q may be F32 with half
  // k and v; out is q's type or F32), or I8 k and v (F32 compute, q F32 or half) with scales.
  DType q_dtype = DType::F32, kv_dtype = DType::F32, out_dtype = DType::F32;
  std::vector<int64_t> batch_shape;  // *batch, possibly empty
  int64_t hq = 0, hkv = 0, lq = 0, lk = 0, d = 0, dv = 0;

  View q, k, v;           // (*batch, H, L, D|Dv), unit stride on the last axis
  // I8 k and v: float32 scales (*batch, Hkv, Lk), key j's row of k or v times its scale;
  // else data == nullptr.
  View k_scale, v_scale;
  // Paged k and v (caches of fixed-size blocks) when paged.on.
  PagedKv paged;
  View out;               // (*batch, Hq, Lq, Dv), unit stride on the last axis, writable
  View lse;               // (*batch, Hq, Lq) or data == nullptr when not requested
  View mask;              // (*batch, Hq, Lq, Lk), any strides, or data == nullptr
  MaskKind mask_kind = MaskKind::None;
  View kv_lengths;        // int64 (*batch), values in [0, lk], or data == nullptr

  double scale = 1.0;
  bool causal = false;
  Align align = Align::BottomRight;
  // Query i sits at key position i + diagonal for causal, window and ALiBi, in place of the
  // offset `align` gives (blocks of one long sequence placed on its global diagonal). The
  // binding keeps |diagonal| <= kMaxDiagonal and bounds the window sides (kMaxDiagonal).
  bool has_diagonal = false;
  int64_t diagonal = 0;
  int64_t window_left = -1, window_right = -1;  // -1 = unbounded on that side
  // Global tokens (hybrid attention, mask.h's GlobalTokens): sorted distinct positions in the
  // rows' coordinates (query i at i + diagonal / offset, key j at j), |position| <=
  // kMaxDiagonal; only with a window (n_globals 0 otherwise).
  const int64_t* globals = nullptr;
  int64_t n_globals = 0;
  int num_threads = 0;                          // 0 = OpenMP default
  double softcap = 0;     // > 0: scores -> softcap * tanh(score / softcap)
  View alibi;             // (*batch, Hq) slopes in the compute type, or data == nullptr
  View sinks;  // (*batch, Hq) sink logits in the compute type (added to each row's softmax
               // denominator only), or data == nullptr
  const void* additive_w = nullptr;  // (D,) compute type: scores sum_d w tanh(q + k), or dot

  // Packed variable-length sequences (flash-attn's varlen), or nullptr: batch_shape is {B},
  // q, k, v, out and lse have batch stride 0 and lq / lk are the packed totals; sequence b is
  // rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q, out and lse and rows
  // [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (B + 1 offsets each, from 0,
  // non-decreasing, ending at the totals). No mask, kv_lengths or additive_w with these.
  const int64_t* cu_seqlens_q = nullptr;
  const int64_t* cu_seqlens_k = nullptr;
};

// Computes the attention described by `p` into p.out (and p.lse). Thread-safe, no GIL needed.
void attention(const Params& p);

}  // namespace cpuattn
