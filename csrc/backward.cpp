// The backward driver: FlashAttention-2's backward (Dao 2023, arXiv 2307.08691, Algorithm 2)
// over the forward's work plan. Each (batch, kv head) pair's keys are cut into chunks and its
// query tiles into row blocks (one or the other, from the shape), and a task is one (pair,
// chunk, row block): for each key tile of its chunk, every query tile of its row block that
// keeps some of the keys is staged (as the forward stages it, query_stage.h) and the kernel's
// backward step recomputes the weights from the saved lse and adds that pair's share to the
// key tile's dK and dV and to the chunk's dQ partial. A key tile's dK and dV are complete at
// the end of its task when the rows are not cut (written then), else summed over the row
// blocks' partials at the end; dQ is the sum of the chunks' partials, in chunk order. No
// atomics, no sum whose order depends on the threads: the results are bitwise identical for
// any thread count, and a single long head (keys cut) or a wide GQA group (rows cut) still
// gives every core work.
#include "backward.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "aligned_buffer.h"
#include "kernels/kernel.h"
#include "mask.h"
#include "mask_columns.h"
#include "plan.h"
#include "query_stage.h"
#include "threads.h"
#include "tiles.h"

namespace cpuattn {
namespace {

// Tasks a call is cut into at least (when the shape allows): pairs x chunks x row blocks. From
// the shape only, never the thread count (the cuts decide the order of the sums); 32 keep 16
// cores busy with causal tasks of unequal cost.
constexpr int64_t kBackwardMinTasks = 32;
// Bytes of partials (chunks x dQ, or row blocks x (dK + dV), in the compute type) past which
// fewer cuts are made.
constexpr int64_t kMaxPartialBytes = int64_t(1) << 28;

// How a call's work is cut: each pair's keys into `chunks` ranges of chunk_keys (tile-aligned)
// and its query tiles into `row_blocks` runs of block_tiles; one task per (pair, chunk, row
// block).
struct BackwardPlan {
  int64_t pairs = 0, chunks = 1, chunk_keys = kTileKeys, row_blocks = 1, block_tiles = 1;
  int64_t tasks() const { return pairs * chunks * row_blocks; }
};

// Cuts the side whose partials cost less: the keys when dQ is the smaller (chunks x dQ), else
// the query rows (row blocks x (dK + dV): a wide GQA group's dQ dwarfs its kv head's dK, dV).
template <typename T>
BackwardPlan plan_backward(const WorkPlan& plan, const Params& p) {
  BackwardPlan c;
  int64_t batch = 1;
  for (int64_t n : p.batch_shape) batch *= n;
  c.pairs = batch * p.hkv;
  const int64_t keys = plan.valid_keys(), key_tiles = (keys + kTileKeys - 1) / kTileKeys;
  const int64_t q_tiles = plan.query_tiles_per_head();
  int64_t chunks = 1, row_blocks = 1;
  if (c.pairs > 0 && c.pairs < kBackwardMinTasks) {
    const int64_t cuts = (kBackwardMinTasks + c.pairs - 1) / c.pairs;
    const int64_t budget = kMaxPartialBytes / int64_t(sizeof(T));
    const int64_t dq_elems = c.pairs * plan.rows_per_head_group() * p.d;
    const int64_t dkv_elems = c.pairs * p.lk * (p.d + p.dv);
    if (dq_elems <= dkv_elems) {
      chunks = std::min(cuts, key_tiles);
      if (dq_elems > 0) chunks = std::min(chunks, budget / dq_elems);
    } else {
      row_blocks = std::min(cuts, q_tiles);
      if (dkv_elems > 0) row_blocks = std::min(row_blocks, budget / dkv_elems);
    }
  }
  chunks = std::max<int64_t>(chunks, 1);
  c.chunk_keys = std::max<int64_t>((key_tiles + chunks - 1) / chunks, 1) * kTileKeys;
  c.chunks = std::max<int64_t>((keys + c.chunk_keys - 1) / c.chunk_keys, 1);
  row_blocks = std::max<int64_t>(row_blocks, 1);
  c.block_tiles = std::max<int64_t>((q_tiles + row_blocks - 1) / row_blocks, 1);
  c.row_blocks = std::max<int64_t>((q_tiles + c.block_tiles - 1) / c.block_tiles, 1);
  return c;
}

// Whether rows x width elements (ld apart) hold an inf or NaN: an exponent of all ones. On the
// bits, so that the compiler vectorizes the test (an OR of integer compares).
template <typename T>
bool any_nonfinite(const T* x, int64_t ld, int64_t rows, int64_t width) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits kExponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits found = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * ld;
    for (int64_t e = 0; e < width; ++e) {
      Bits b;
      std::memcpy(&b, row + e, sizeof(b));
      found |= Bits((b & kExponent) == kExponent);
    }
  }
  return found != 0;
}

// Key tiles a task sweeps its query tiles with at once: each query tile's operands, dQ rows
// and staging are then read once per kSweepKeyTiles key tiles, not once per key tile (the
// query side streams through the caches for every sweep: 1.3x the bfloat16 backward at
// D = 128 on AMX, measured), for kSweepKeyTiles key tiles' packs and accumulators (L2).
constexpr int64_t kSweepKeyTiles = 4;

// Query tiles whose P and dS the bfloat16 products keep for each key tile of the sweep, to
// sum their dK and dV contributions with the accumulators in (tile) registers
// (Bf16BackwardKernels).
constexpr int64_t kQueryBlockTiles = 8;
static_assert(kSweepKeyTiles <= kBf16BackwardMaxTiles && kQueryBlockTiles <= kBf16BackwardMaxTiles,
              "a bfloat16 product part sums at most kBf16BackwardMaxTiles tiles");

// Bytes of one thread's bfloat16 query operands (Bf16Scratch) past which they are prepared
// again for every query block rather than kept for the task's whole row block (64 query tiles
// at D = Dv = 256, 128 at 128).
constexpr int64_t kMaxBf16QueryBytes = int64_t(1) << 23;

// One query tile's bfloat16 operands for the bfloat16 products: rows and their transposes.
struct Bf16QueryTile {
  const uint16_t* q;       // kTileRows x d, zero past the tile's rows
  const uint16_t* q_t;     // d x kTileRows
  const uint16_t* dout;    // kTileRows x dv
  const uint16_t* dout_t;  // dv x kTileRows
  bool exact;              // q and dout held bfloat16 values (else truncated: not to be used)
};
constexpr int8_t kReadyExact = 1, kReadyInexact = 2;  // Bf16Scratch::ready

// One thread's bfloat16 operands for the bfloat16 products: the sweep's key tiles' (packed with
// them, with their dK^T and dV^T accumulators), the query tiles' of its task's row block (each
// prepared on the tile's first pair and kept for the others; past kMaxBf16QueryBytes, for the
// query block in flight only), and the P and dS of a query block against the sweep's tiles.
struct Bf16Scratch {
  static constexpr int64_t kPairsPerTile = kTileRows / 2 * kTileKeys;
  AlignedBuffer<uint32_t> kt, vt, k;  // kSweepKeyTiles key tiles each
  AlignedBuffer<float> dk_t, dv_t;
  AlignedBuffer<uint16_t> q, q_t, dout, dout_t;  // `slots` query tiles each
  AlignedBuffer<int8_t> ready;  // per slot, for the task in flight: 0 or kReady*
  AlignedBuffer<uint32_t> p, ds;  // kSweepKeyTiles x kQueryBlockTiles x kPairsPerTile
  AlignedBuffer<uint16_t> ds_rows;  // kSweepKeyTiles x kTileRows x kTileKeys
  int64_t slots = 0;

  Bf16Scratch() = default;
  Bf16Scratch(int64_t d, int64_t dv, int64_t block_tiles)
      : kt(kSweepKeyTiles * d / 2 * kTileKeys), vt(kSweepKeyTiles * dv / 2 * kTileKeys),
        k(kSweepKeyTiles * kTileKeys / 2 * d), dk_t(kSweepKeyTiles * d * kTileKeys),
        dv_t(kSweepKeyTiles * dv * kTileKeys), p(kSweepKeyTiles * kQueryBlockTiles * kPairsPerTile),
        ds(kSweepKeyTiles * kQueryBlockTiles * kPairsPerTile),
        ds_rows(kSweepKeyTiles * kTileRows * kTileKeys) {
    const int64_t tile_bytes = 2 * kTileRows * (d + dv) * int64_t(sizeof(uint16_t));
    slots = block_tiles * tile_bytes <= kMaxBf16QueryBytes ? block_tiles : kQueryBlockTiles;
    q.allocate(slots * kTileRows * d);
    q_t.allocate(slots * kTileRows * d);
    dout.allocate(slots * kTileRows * dv);
    dout_t.allocate(slots * kTileRows * dv);
    ready.allocate(slots);
  }
};

// Per-thread buffers, allocated before the parallel region; each written before it is read.
template <typename T>
struct alignas(64) BackwardScratch {
  QueryRows<T> rows;  // positions, bounds, mask rows, slopes, scores, q (unless read in place)
  AlignedBuffer<T> dout, lse, delta, dp, cap_grad;  // the query tile's
  AlignedBuffer<T> kt, vt, dk, dv;  // the sweep's kSweepKeyTiles key tiles'
  AlignedBuffer<int8_t> tile_nonfinite;  // per query tile of the task's head: -1 not yet known
  Bf16Scratch bf16;                      // with the bfloat16 products only

  BackwardScratch(const Params& p, int64_t q_tiles, bool bf16_products, int64_t block_tiles)
      : rows(p.d, p.dv, -1), dout(kTileRows * p.dv), lse(kTileRows), delta(kTileRows),
        dp(kTileRows * kTileKeys), cap_grad(p.softcap > 0 ? kTileRows * kTileKeys : 0),
        kt(kSweepKeyTiles * p.d * kTileKeys), vt(kSweepKeyTiles * p.dv * kTileKeys),
        dk(kSweepKeyTiles * kTileKeys * p.d), dv(kSweepKeyTiles * kTileKeys * p.dv),
        tile_nonfinite(q_tiles) {
    if (bf16_products) bf16 = Bf16Scratch(p.d, p.dv, block_tiles);
  }
};

// float32 values that are bfloat16 ones: their upper halves; a pair, the first in the low half.
// bf16_rest: the lower half, 0 for a bfloat16 value (the caller's promise, checked).
inline uint16_t bf16_bits(float x) { return uint16_t(f32_to_bits(x) >> 16); }
inline uint32_t bf16_rest(float x) { return f32_to_bits(x) & 0xffffu; }
inline uint32_t bf16_pair(float first, float second) {
  return uint32_t(bf16_bits(first)) | uint32_t(bf16_bits(second)) << 16;
}

// The bfloat16 products' backward for this call (AMX or AVX512-BF16), or nullptr: bfloat16
// inputs, float32 compute, D and Dv multiples of the kernels' dim_multiple.
template <typename T>
const Bf16BackwardKernels* bf16_backward(const BackwardParams& bp, const KernelSet& kernels) {
  const Params& p = bp.fwd;
  const Bf16BackwardKernels& k = kernels.backward_bf16;
  if (!std::is_same_v<T, float> || !bp.bf16_inputs || k.weights == nullptr) return nullptr;
  const bool fits = p.d > 0 && p.d % k.dim_multiple == 0 && p.dv > 0 && p.dv % k.dim_multiple == 0;
  return fits ? &k : nullptr;
}

// How a gradient's elements are stored: the compute type, or rounded to a half type by the
// ISA's kernels (float32 compute only).
struct GradientType {
  int64_t item;                                // bytes per element
  decltype(EncodingOps::from_float) half;      // nullptr: the compute type
};

template <typename T>
GradientType gradient_type(DType dtype, const KernelSet& kernels) {
  if (std::is_same_v<T, float> && (dtype == DType::F16 || dtype == DType::BF16)) {
    return {2, kernels.encodings[int(dtype == DType::F16 ? Elem::F16 : Elem::Bf16)].from_float};
  }
  return {int64_t(sizeof(T)), nullptr};
}

// dst[0, n) = src[e] * scale, stored as `type` says.
template <typename T>
void store_scaled(const GradientType& type, void* dst, const T* src, int64_t n, T scale) {
  if constexpr (std::is_same_v<T, float>) {
    if (type.half) {
      type.half(src, scale, n, dst);
      return;
    }
  }
  T* out = static_cast<T*>(dst);
  for (int64_t e = 0; e < n; ++e) out[e] = src[e] * scale;
}

// Elements summed and stored at a time by the partial sums (a local buffer: no allocation).
constexpr int64_t kSumChunk = 256;

// dst[0, n) = (the sum over `parts` partials of first[e + part * part_stride], in part order)
// times scale, stored as `type` says.
template <typename T>
void store_sum(const T* first, int64_t parts, int64_t part_stride, int64_t n,
               const GradientType& type, char* dst, T scale) {
  T sums[kSumChunk];
  for (int64_t e0 = 0; e0 < n; e0 += kSumChunk) {
    const int64_t m = std::min(kSumChunk, n - e0);
    for (int64_t e = e0; e < e0 + m; ++e) {
      T sum = first[e];
      for (int64_t part = 1; part < parts; ++part) sum += first[part * part_stride + e];
      sums[e - e0] = sum;
    }
    store_scaled(type, dst + e0 * type.item, sums, m, scale);
  }
}

// Where a key tile's finished dK or dV rows go: the caller's array (rows ld apart, times
// scale), or a row block's partial.
template <typename T>
struct KeyRowsOut {
  char* rows;
  int64_t ld;  // elements
  T scale;
  GradientType type;
};

template <typename T>
class BackwardDriver {
 public:
  BackwardDriver(const BackwardParams& bp, const KernelSet& kernels, const WorkPlan& plan,
                 const BackwardPlan& cut)
      : bp_(bp), p_(bp.fwd), plan_(plan), cut_(cut), group_(plan.group()),
        rows_per_pair_(plan.rows_per_head_group()), q_tiles_(plan.query_tiles_per_head()),
        bf16_(bf16_backward<T>(bp, kernels)),  // before query_: declared before it
        // With bfloat16 products, q is bfloat16 as it is: staged unscaled, the scores scaled.
        query_(bp.fwd, kernels, plan, -1, false, bf16_ == nullptr) {
    if constexpr (std::is_same_v<T, float>) {
      step_ = kernels.backward_f32;
      pack_ = kernels.pack_f32;
    } else {
      step_ = kernels.backward_f64;
      pack_ = kernels.pack_f64;
    }
    const size_t nb = p_.batch_shape.size();
    proto_ = call_step<T>(p_);
    proto_.key.form = KeyForm::PackedT;
    proto_.key.elem = Elem::Compute;
    // dK = dS^T (scale q): the scale is in a staged q, and applied to dK for one read in place.
    dk_scale_ = query_.unscaled() ? static_cast<T>(p_.scale) : T(1);
    // One chunk and no GQA group: a pair's dQ rows are one head's, accumulated in dq itself
    // when they are D apart (scaled in place at the end), with no partial to allocate.
    dq_type_ = gradient_type<T>(bp.dq_dtype, kernels);
    dk_type_ = gradient_type<T>(bp.dk_dtype, kernels);
    dv_type_ = gradient_type<T>(bp.dv_dtype, kernels);
    dq_in_place_ =
        cut.chunks == 1 && group_ == 1 && bp.dq.strides[nb + 1] == p_.d && dq_type_.half == nullptr;
    // dout rows read in place when a tile's rows are a constant stride apart (as QueryStage
    // decides for q): positions of one head, or heads of one position, or a (B, L, H, D) view.
    const int64_t head_stride = bp.dout.strides[nb], pos_stride = bp.dout.strides[nb + 1];
    if (group_ == 1) {
      dout_ld_ = pos_stride;
    } else if (rows_per_pair_ <= group_ || pos_stride == group_ * head_stride) {
      dout_ld_ = head_stride;
    }
  }

  int64_t q_tiles() const { return q_tiles_; }
  bool bf16_products() const { return bf16_ != nullptr; }
  bool dq_in_place() const { return dq_in_place_; }
  int64_t key_tiles() const { return (p_.lk + kTileKeys - 1) / kTileKeys; }
  int64_t dq_elems() const { return rows_per_pair_ * p_.d; }  // one pair's dQ
  int64_t dk_elems() const { return p_.lk * p_.d; }  // one pair's dK
  int64_t dv_elems() const { return p_.lk * p_.dv; }

  // The task's chunk, row block and pair: every pair's last row block and first chunk first
  // (the costliest under causal masks). Its dQ rows go to dq_parts[chunk][pair]; with the rows
  // cut, its dK and dV to dk_parts, dv_parts[row block][pair].
  void run_task(int64_t task, BackwardScratch<T>& sc, T* dq_parts, T* dk_parts, T* dv_parts) const {
    const int64_t pair = task % cut_.pairs, rest = task / cut_.pairs;
    const int64_t chunk = rest % cut_.chunks, block = cut_.row_blocks - 1 - rest / cut_.chunks;
    const int64_t t_begin = block * cut_.block_tiles;
    const int64_t t_end = std::min(t_begin + cut_.block_tiles, q_tiles_);
    const int64_t r_end = std::min(t_end * kTileRows, rows_per_pair_);
    const ItemPos head = plan_.locate(pair * q_tiles_);
    T* dq = dq_in_place_ ? dq_rows_of(head) : dq_parts + (chunk * cut_.pairs + pair) * dq_elems();
    std::fill(dq + t_begin * kTileRows * p_.d, dq + r_end * p_.d, T(0));
    std::fill(sc.tile_nonfinite.data(), sc.tile_nonfinite.data() + q_tiles_, int8_t(-1));
    std::fill(sc.bf16.ready.data(), sc.bf16.ready.data() + sc.bf16.slots, int8_t(0));

    const RowBounds rb = plan_.row_bounds(head);
    const int64_t k_begin = chunk * cut_.chunk_keys;
    const int64_t k_end = std::min(k_begin + cut_.chunk_keys, rb.n_keys);
    KeyRowsOut<T> dk, dv;
    if (cut_.row_blocks == 1) {
      dk = key_rows_of(bp_.dk, head, dk_scale_, dk_type_);
      dv = key_rows_of(bp_.dv, head, T(1), dv_type_);
    } else {
      const int64_t part = block * cut_.pairs + pair;
      const GradientType compute{int64_t(sizeof(T)), nullptr};
      dk = {reinterpret_cast<char*>(dk_parts + part * dk_elems()), p_.d, T(1), compute};
      dv = {reinterpret_cast<char*>(dv_parts + part * dv_elems()), p_.dv, T(1), compute};
    }
    // Every key row of the chunk is written: a tile's dK and dV, or 0 for a tile no query of
    // the block keeps and for keys past the valid ones (to Lk, by the last chunk).
    const int64_t i_first = t_begin * kTileRows / group_, i_last = (r_end - 1) / group_;
    constexpr int64_t kSweepKeys = kSweepKeyTiles * kTileKeys;
    for (int64_t g0 = k_begin; g0 < k_end; g0 += kSweepKeys) {
      KeyTile tiles[kSweepKeyTiles];
      int n = 0;
      for (int64_t j0 = g0; j0 < std::min(g0 + kSweepKeys, k_end); j0 += kTileKeys) {
        const int64_t j1 = std::min(j0 + kTileKeys, k_end);
        if (classify_tile(rb, i_first, i_last, j0, j1) == TileKind::Skip) {
          zero_key_rows(dk, j0, j1, p_.d);
          zero_key_rows(dv, j0, j1, p_.dv);
          continue;
        }
        tiles[n] = start_key_tile(head, j0, j1, n, sc);
        ++n;
      }
      if (bf16_) {
        sweep_bf16(rb, pair, tiles, n, t_begin, t_end, sc, dq);
      } else {
        sweep(rb, pair, tiles, n, t_begin, t_end, sc, dq);
      }
      for (int g = 0; g < n; ++g) finish_key_tile(tiles[g], sc, dk, dv);
    }
    const int64_t zero_end =
        chunk + 1 == cut_.chunks ? p_.lk : std::min(k_begin + cut_.chunk_keys, p_.lk);
    zero_key_rows(dk, std::max(k_begin, k_end), zero_end, p_.d);
    zero_key_rows(dv, std::max(k_begin, k_end), zero_end, p_.dv);
  }

  // dQ = scale x the sum of the chunks' partials, in chunk order, for the rows of query tile
  // `tile` (pair x q_tiles + tile in the head); dQ accumulated in place is scaled.
  void finish_dq(int64_t tile, const T* dq_parts) const {
    const int64_t pair = tile / q_tiles_, r0 = (tile % q_tiles_) * kTileRows;
    const int64_t rows = std::min(kTileRows, rows_per_pair_ - r0);
    const ItemPos head = plan_.locate(pair * q_tiles_);
    if (dq_in_place_) {
      T* dq = dq_rows_of(head) + r0 * p_.d;
      const T scale = static_cast<T>(p_.scale);
      for (int64_t e = 0; e < rows * p_.d; ++e) dq[e] *= scale;
      return;
    }
    const size_t nb = p_.batch_shape.size();
    char* dq = static_cast<char*>(const_cast<void*>(bp_.dq.data)) +
               batch_offset(p_.batch_shape, bp_.dq, head.b) * dq_type_.item;
    const T scale = static_cast<T>(p_.scale);
    const int64_t d = p_.d, stride = cut_.pairs * dq_elems();
    for (int64_t r = r0; r < r0 + rows; ++r) {
      const int64_t i = r / group_, h = head.hk * group_ + r % group_;
      char* out = dq + (h * bp_.dq.strides[nb] + i * bp_.dq.strides[nb + 1]) * dq_type_.item;
      const T* first = dq_parts + pair * dq_elems() + r * d;
      store_sum(first, cut_.chunks, stride, d, dq_type_, out, scale);
    }
  }

  // With the rows cut: dK and dV of key tile `tile` (pair x key_tiles + tile) = the sum of the
  // row blocks' partials, in block order.
  void finish_dkv(int64_t tile, const T* dk_parts, const T* dv_parts) const {
    const int64_t pair = tile / key_tiles(), j0 = (tile % key_tiles()) * kTileKeys;
    const int64_t j1 = std::min(j0 + kTileKeys, p_.lk);
    const ItemPos head = plan_.locate(pair * q_tiles_);
    sum_key_rows(key_rows_of(bp_.dk, head, dk_scale_, dk_type_), dk_parts + pair * dk_elems(),
                 dk_elems(), p_.d, j0, j1);
    sum_key_rows(key_rows_of(bp_.dv, head, T(1), dv_type_), dv_parts + pair * dv_elems(),
                 dv_elems(), p_.dv, j0, j1);
  }

 private:
  // A key tile of the sweep: its keys, K and V rows, and its slot in the scratch buffers.
  struct KeyTile {
    int64_t j0 = 0, j1 = 0, slot = 0;
    const T* k = nullptr;
    const T* v = nullptr;
    bool keys_nonfinite = false;
    bool packed = false;  // the float32 step's K^T and V^T are in the slot
    bool bf16_exact = false;  // K and V hold bfloat16 values: packed as bfloat16 pairs
  };

  // Keys [j0, j1) of the pair into scratch slot `slot`: packed as bfloat16 pairs (or the
  // float32 step, without it), accumulators zeroed.
  KeyTile start_key_tile(const ItemPos& head, int64_t j0, int64_t j1, int64_t slot,
                         BackwardScratch<T>& sc) const {
    const size_t nb = p_.batch_shape.size();
    KeyTile tile;
    tile.j0 = j0;
    tile.j1 = j1;
    tile.slot = slot;
    tile.k = static_cast<const T*>(p_.k.data) + batch_offset(p_.batch_shape, p_.k, head.b) +
             head.hk * p_.k.strides[nb] + j0 * p_.k.strides[nb + 1];
    tile.v = static_cast<const T*>(p_.v.data) + batch_offset(p_.batch_shape, p_.v, head.b) +
             head.hk * p_.v.strides[nb] + j0 * p_.v.strides[nb + 1];
    const int64_t cols = j1 - j0;
    if (bf16_) {
      tile.bf16_exact = pack_bf16_keys(tile, sc.bf16);
    } else {
      pack_compute(tile, sc);
    }
    std::fill(sc.dk.data() + slot * kTileKeys * p_.d,
              sc.dk.data() + slot * kTileKeys * p_.d + cols * p_.d, T(0));
    std::fill(sc.dv.data() + slot * kTileKeys * p_.dv,
              sc.dv.data() + slot * kTileKeys * p_.dv + cols * p_.dv, T(0));
    tile.keys_nonfinite = any_nonfinite(tile.k, p_.k.strides[nb + 1], cols, p_.d);
    return tile;
  }

  // The float32 step's K^T and V^T of the tile (always without bfloat16 products, else for the
  // first pair that needs that step: a non-finite operand).
  void pack_compute(KeyTile& tile, BackwardScratch<T>& sc) const {
    if (tile.packed) return;
    const size_t nb = p_.batch_shape.size();
    const int64_t cols = tile.j1 - tile.j0;
    // Whole zero-padded tiles: the backward's products cover all kTileKeys columns.
    pack_(tile.k, p_.k.strides[nb + 1], cols, p_.d, sc.kt.data() + tile.slot * p_.d * kTileKeys,
          kTileKeys);
    pack_(tile.v, p_.v.strides[nb + 1], cols, p_.dv, sc.vt.data() + tile.slot * p_.dv * kTileKeys,
          kTileKeys);
    tile.packed = true;
  }

  // Query tile t of the pair, staged (rows, dout, lse, delta, and whether an operand is inf or
  // NaN) as the query side of its steps.
  BackwardStep<T> stage_query(const RowBounds& rb, int64_t pair, int64_t t, int64_t rows,
                              BackwardScratch<T>& sc, T* dq) const {
    const ItemPos pos = plan_.locate(pair * q_tiles_ + q_tiles_ - 1 - t);
    query_.stage(pos, rb, sc.rows, false);
    BackwardStep<T> b;
    b.scores = proto_;
    query_.point(b.scores, sc.rows, rows);
    stage_rows(pos, sc, b);
    if (sc.tile_nonfinite[t] < 0) {
      sc.tile_nonfinite[t] = any_nonfinite(b.scores.q, b.scores.q_ld, rows, p_.d) ||
                             any_nonfinite(b.dout, b.dout_ld, rows, p_.dv);
    }
    b.lse = sc.lse.data();
    b.delta = sc.delta.data();
    b.dp = sc.dp.data();
    b.cap_grad = sc.cap_grad.data();
    b.dq = dq + t * kTileRows * p_.d;
    b.rows_nonfinite = sc.tile_nonfinite[t] != 0;
    b.bf16_operands = nullptr;
    return b;
  }

  // The step of a staged query tile (base) with one key tile of the sweep.
  BackwardStep<T> pair_step(const BackwardStep<T>& base, const KeyTile& tile, TileKind kind,
                            const RowBounds& rb, BackwardScratch<T>& sc) const {
    const size_t nb = p_.batch_shape.size();
    BackwardStep<T> b = base;
    b.scores.cols = tile.j1 - tile.j0;
    b.scores.j0 = tile.j0;
    b.scores.apply_bounds = kind == TileKind::Partial;
    b.scores.global_cols = kind == TileKind::Partial ? rb.global_cols(tile.j0, tile.j1) : 0;
    b.k = tile.k;
    b.k_ld = p_.k.strides[nb + 1];
    b.dk = sc.dk.data() + tile.slot * kTileKeys * p_.d;
    b.dv = sc.dv.data() + tile.slot * kTileKeys * p_.dv;
    b.keys_nonfinite = tile.keys_nonfinite;
    return b;
  }

  // The float32 step on a pair (which skips inf or NaN operands where P is 0).
  void float_step(BackwardStep<T>& b, KeyTile& tile, BackwardScratch<T>& sc) const {
    pack_compute(tile, sc);
    b.scores.key.data = sc.kt.data() + tile.slot * p_.d * kTileKeys;
    b.vt = sc.vt.data() + tile.slot * p_.dv * kTileKeys;
    step_(b);
  }

  // The sweep's n key tiles against the query tiles [t_begin, t_end), with the float32 step:
  // each query tile that keeps some of their keys is staged once, then stepped with each.
  void sweep(const RowBounds& rb, int64_t pair, KeyTile* tiles, int n, int64_t t_begin,
             int64_t t_end, BackwardScratch<T>& sc, T* dq) const {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * kTileRows, rows = std::min(kTileRows, rows_per_pair_ - r0);
      BackwardStep<T> base;
      bool staged = false;
      for (int g = 0; g < n; ++g) {
        const TileKind kind =
            classify_tile(rb, r0 / group_, (r0 + rows - 1) / group_, tiles[g].j0, tiles[g].j1);
        if (kind == TileKind::Skip) continue;
        if (!staged) base = stage_query(rb, pair, t, rows, sc, dq);
        staged = true;
        BackwardStep<T> b = pair_step(base, tiles[g], kind, rb, sc);
        if (mask_kept_cols(b.scores) == 0) continue;  // the mask drops the whole tile
        float_step(b, tiles[g], sc);
      }
    }
  }

  // The same with bfloat16 products, a block of kQueryBlockTiles query tiles at a time: per pair,
  // P and dS (weights); per query tile, dQ from all the sweep's tiles (dq); per key tile,
  // dK^T and dV^T from the whole block (key_gradient). A pair with an inf or NaN operand takes
  // the float32 step.
  void sweep_bf16(const RowBounds& rb, int64_t pair, KeyTile* tiles, int n, int64_t t_begin,
                  int64_t t_end, BackwardScratch<T>& sc, T* dq) const {
    if constexpr (std::is_same_v<T, float>) {
      Bf16Scratch& x = sc.bf16;
      const int64_t d = p_.d, dv = p_.dv;
      const bool all_kept = x.slots >= t_end - t_begin;  // every query tile's operands kept
      for (int64_t tb = t_begin; tb < t_end; tb += kQueryBlockTiles) {
        const int64_t te = std::min(tb + kQueryBlockTiles, t_end);
        if (!all_kept) std::fill(x.ready.data(), x.ready.data() + x.slots, int8_t(0));
        // Per key tile, the block's query tiles it met as bfloat16 (for key_gradient).
        int met[kSweepKeyTiles] = {};
        const uint16_t* q_t[kSweepKeyTiles][kQueryBlockTiles];
        const uint16_t* dout_t[kSweepKeyTiles][kQueryBlockTiles];
        const uint32_t* p[kSweepKeyTiles][kQueryBlockTiles];
        const uint32_t* ds[kSweepKeyTiles][kQueryBlockTiles];
        int64_t row_chunks[kSweepKeyTiles][kQueryBlockTiles];
        for (int64_t t = tb; t < te; ++t) {
          const int64_t r0 = t * kTileRows, rows = std::min(kTileRows, rows_per_pair_ - r0);
          BackwardStep<T> base;
          Bf16QueryTile query{};
          bool staged = false;
          // The key tiles whose dS goes to this tile's dQ as bfloat16 products.
          int summed = 0;
          const uint16_t* ds_rows[kSweepKeyTiles];
          const uint32_t* k_pairs[kSweepKeyTiles];
          int64_t key_chunks[kSweepKeyTiles];
          for (int g = 0; g < n; ++g) {
            KeyTile& tile = tiles[g];
            const TileKind kind =
                classify_tile(rb, r0 / group_, (r0 + rows - 1) / group_, tile.j0, tile.j1);
            if (kind == TileKind::Skip) continue;
            if (!staged) {
              base = stage_query(rb, pair, t, rows, sc, dq);
              if (!base.rows_nonfinite) {
                query = bf16_query(x, all_kept ? t - t_begin : t - tb, base);
              }
              staged = true;
            }
            BackwardStep<T> b = pair_step(base, tile, kind, rb, sc);
            if (mask_kept_cols(b.scores) == 0) continue;  // the mask drops the whole tile
            if (b.rows_nonfinite || b.keys_nonfinite || !query.exact || !tile.bf16_exact) {
              float_step(b, tile, sc);
              continue;
            }
            const int64_t slot = tile.slot, m = met[g];
            const Bf16BackwardOperands ops{query.q, query.dout,
                                           x.kt.data() + slot * d / 2 * kTileKeys,
                                           x.vt.data() + slot * dv / 2 * kTileKeys};
            b.bf16_operands = &ops;
            uint32_t* p_pairs = x.p.data() + (slot * kQueryBlockTiles + m) * x.kPairsPerTile;
            uint32_t* ds_pairs = x.ds.data() + (slot * kQueryBlockTiles + m) * x.kPairsPerTile;
            uint16_t* rows_out = x.ds_rows.data() + slot * kTileRows * kTileKeys;
            bf16_->weights(b, p_pairs, ds_pairs, rows_out);
            q_t[g][m] = query.q_t;
            dout_t[g][m] = query.dout_t;
            p[g][m] = p_pairs;
            ds[g][m] = ds_pairs;
            row_chunks[g][m] = (rows + 31) / 32;
            met[g] = m + 1;
            ds_rows[summed] = rows_out;
            k_pairs[summed] = x.k.data() + slot * kTileKeys / 2 * d;
            key_chunks[summed] = (tile.j1 - tile.j0 + 31) / 32;
            ++summed;
          }
          if (summed > 0) bf16_->dq(base.dq, rows, d, summed, ds_rows, k_pairs, key_chunks);
        }
        for (int g = 0; g < n; ++g) {
          if (met[g] == 0) continue;
          const int64_t slot = tiles[g].slot;
          bf16_->key_gradient(x.dv_t.data() + slot * dv * kTileKeys, dv, met[g], dout_t[g], p[g],
                              row_chunks[g]);
          bf16_->key_gradient(x.dk_t.data() + slot * d * kTileKeys, d, met[g], q_t[g], ds[g],
                              row_chunks[g]);
        }
      }
    } else {
      sweep(rb, pair, tiles, n, t_begin, t_end, sc, dq);
    }
  }

  // The tile's dK and dV, complete for the task's rows, to dk and dv.
  void finish_key_tile(const KeyTile& tile, BackwardScratch<T>& sc, const KeyRowsOut<T>& dk,
                       const KeyRowsOut<T>& dv) const {
    const int64_t cols = tile.j1 - tile.j0;
    T* dk_rows = sc.dk.data() + tile.slot * kTileKeys * p_.d;
    T* dv_rows = sc.dv.data() + tile.slot * kTileKeys * p_.dv;
    if (bf16_) {
      add_transposed(sc.bf16.dk_t.data() + tile.slot * p_.d * kTileKeys, cols, p_.d, dk_rows);
      add_transposed(sc.bf16.dv_t.data() + tile.slot * p_.dv * kTileKeys, cols, p_.dv, dv_rows);
    }
    write_key_rows(dk, tile.j0, cols, p_.d, dk_rows);
    write_key_rows(dv, tile.j0, cols, p_.dv, dv_rows);
  }

  // The key tile's bfloat16 operands into its slot: K^T and V^T as pairs along D, K as pairs
  // of keys, zero past its keys; dK^T and dV^T accumulators zeroed. Returns whether K and V
  // held bfloat16 values (else the pairs are truncated and its pairs take the float32 step).
  bool pack_bf16_keys(const KeyTile& tile, Bf16Scratch& x) const {
    const size_t nb = p_.batch_shape.size();
    const int64_t d = p_.d, dv = p_.dv, cols = tile.j1 - tile.j0, slot = tile.slot;
    const int64_t k_ld = p_.k.strides[nb + 1], v_ld = p_.v.strides[nb + 1];
    // Pairs along a row of x (ld apart) -> transposed pairs, zero past cols.
    uint32_t rest = 0;
    const auto pairs_t = [cols, &rest](const T* x, int64_t ld, int64_t width, uint32_t* to) {
      for (int64_t j = 0; j < kTileKeys; ++j) {
        for (int64_t e = 0; e < width; e += 2) {
          if (j >= cols) {
            to[e / 2 * kTileKeys + j] = 0;
            continue;
          }
          const T first = x[j * ld + e], second = x[j * ld + e + 1];
          rest |= bf16_rest(first) | bf16_rest(second);
          to[e / 2 * kTileKeys + j] = bf16_pair(first, second);
        }
      }
    };
    pairs_t(tile.k, k_ld, d, x.kt.data() + slot * d / 2 * kTileKeys);
    pairs_t(tile.v, v_ld, dv, x.vt.data() + slot * dv / 2 * kTileKeys);
    const T* k = tile.k;
    for (int64_t j = 0; j < kTileKeys; j += 2) {  // pairs of keys
      uint32_t* row = x.k.data() + slot * kTileKeys / 2 * d + j / 2 * d;
      for (int64_t e = 0; e < d; ++e) {
        row[e] = bf16_pair(j < cols ? k[j * k_ld + e] : T(0),
                           j + 1 < cols ? k[(j + 1) * k_ld + e] : T(0));
      }
    }
    std::fill(x.dk_t.data() + slot * d * kTileKeys, x.dk_t.data() + (slot + 1) * d * kTileKeys,
              0.0f);
    std::fill(x.dv_t.data() + slot * dv * kTileKeys, x.dv_t.data() + (slot + 1) * dv * kTileKeys,
              0.0f);
    return rest == 0;
  }

  // Query tile `slot` of the row block as bfloat16 rows and their transposes (prepared on
  // its first pair, from the pair's unscaled q and dout rows), and whether they held
  // bfloat16 values.
  Bf16QueryTile bf16_query(Bf16Scratch& x, int64_t slot, const BackwardStep<T>& b) const {
    const int64_t d = p_.d, dv = p_.dv, rows = b.scores.rows;
    uint16_t* q = x.q.data() + slot * kTileRows * d;
    uint16_t* q_t = x.q_t.data() + slot * kTileRows * d;
    uint16_t* dout = x.dout.data() + slot * kTileRows * dv;
    uint16_t* dout_t = x.dout_t.data() + slot * kTileRows * dv;
    if (!x.ready[slot]) {
      uint32_t rest = 0;
      const auto prepare = [rows, &rest](const T* src, int64_t ld, int64_t width, uint16_t* out,
                                         uint16_t* out_t) {
        for (int64_t r = 0; r < kTileRows; ++r) {
          for (int64_t e = 0; e < width; ++e) {
            const T value = r < rows ? src[r * ld + e] : T(0);
            rest |= bf16_rest(value);
            out[r * width + e] = bf16_bits(value);
            out_t[e * kTileRows + r] = bf16_bits(value);
          }
        }
      };
      prepare(b.scores.q, b.scores.q_ld, d, q, q_t);
      prepare(b.dout, b.dout_ld, dv, dout, dout_t);
      x.ready[slot] = rest == 0 ? kReadyExact : kReadyInexact;
    }
    return {q, q_t, dout, dout_t, x.ready[slot] == kReadyExact};
  }

  // acc[j][e] += acc_t[e][j], j < cols, e < width (the bfloat16 products' dK^T or dV^T).
  static void add_transposed(const float* acc_t, int64_t cols, int64_t width, T* acc) {
    for (int64_t j = 0; j < cols; ++j) {
      for (int64_t e = 0; e < width; ++e) acc[j * width + e] += acc_t[e * kTileKeys + j];
    }
  }

  // The tile's dout rows (in place, or copied), lse (+inf for a row that kept no key: all its
  // weights are then 0) and delta, in its row order (the rows' heads and positions, as stage()
  // left them), into the step.
  void stage_rows(const ItemPos& pos, BackwardScratch<T>& sc, BackwardStep<T>& b) const {
    const size_t nb = p_.batch_shape.size();
    const T* dout =
        static_cast<const T*>(bp_.dout.data) + batch_offset(p_.batch_shape, bp_.dout, pos.b);
    const T* lse = static_cast<const T*>(p_.lse.data) + batch_offset(p_.batch_shape, p_.lse, pos.b);
    const T* delta =
        static_cast<const T*>(bp_.delta.data) + batch_offset(p_.batch_shape, bp_.delta, pos.b);
    constexpr T kInf = std::numeric_limits<T>::infinity();
    const int64_t head_stride = bp_.dout.strides[nb], pos_stride = bp_.dout.strides[nb + 1];
    if (dout_ld_ != 0) {
      b.dout = dout + sc.rows.head[0] * head_stride + sc.rows.pos[0] * pos_stride;
      b.dout_ld = dout_ld_;
    } else {
      b.dout = sc.dout.data();
      b.dout_ld = p_.dv;
    }
    for (int64_t r = 0; r < pos.rows; ++r) {
      const int64_t h = sc.rows.head[r], i = sc.rows.pos[r];
      if (dout_ld_ == 0) {
        const T* row = dout + h * head_stride + i * pos_stride;
        std::copy(row, row + p_.dv, sc.dout.data() + r * p_.dv);
      }
      const T row_lse = lse[h * p_.lse.strides[nb] + i * p_.lse.strides[nb + 1]];
      sc.lse[r] = row_lse == -kInf ? kInf : row_lse;
      sc.delta[r] = delta[h * bp_.delta.strides[nb] + i * bp_.delta.strides[nb + 1]];
    }
  }

  // The pair's dQ rows (dq_in_place_: its one head's), D apart.
  T* dq_rows_of(const ItemPos& head) const {
    const size_t nb = p_.batch_shape.size();
    return static_cast<T*>(const_cast<void*>(bp_.dq.data)) +
           batch_offset(p_.batch_shape, bp_.dq, head.b) + head.hk * bp_.dq.strides[nb];
  }

  // The pair's rows of a (*batch, Hkv, Lk, width) gradient.
  KeyRowsOut<T> key_rows_of(const View& to, const ItemPos& head, T scale,
                            const GradientType& type) const {
    const size_t nb = p_.batch_shape.size();
    char* base = static_cast<char*>(const_cast<void*>(to.data)) +
                 (batch_offset(p_.batch_shape, to, head.b) + head.hk * to.strides[nb]) * type.item;
    return {base, to.strides[nb + 1], scale, type};
  }

  // Rows [j0, j1) of `to` set to 0 (all bits zero in every type).
  static void zero_key_rows(const KeyRowsOut<T>& to, int64_t j0, int64_t j1, int64_t width) {
    for (int64_t j = j0; j < j1; ++j) {
      std::memset(to.rows + j * to.ld * to.type.item, 0, width * to.type.item);
    }
  }

  // Rows [j0, j0 + cols) of `to`, from the tile's accumulators.
  static void write_key_rows(const KeyRowsOut<T>& to, int64_t j0, int64_t cols, int64_t width,
                             const T* acc) {
    for (int64_t j = 0; j < cols; ++j) {
      store_scaled(to.type, to.rows + (j0 + j) * to.ld * to.type.item, acc + j * width, width,
                   to.scale);
    }
  }

  // Rows [j0, j1) of `to` = the sum over row blocks of parts (the first block's; `stride`
  // apart), in block order.
  void sum_key_rows(const KeyRowsOut<T>& to, const T* parts, int64_t stride, int64_t width,
                    int64_t j0, int64_t j1) const {
    const int64_t block_stride = cut_.pairs * stride;
    for (int64_t j = j0; j < j1; ++j) {
      char* row = to.rows + j * to.ld * to.type.item;
      const T* first = parts + j * width;
      store_sum(first, cut_.row_blocks, block_stride, width, to.type, row, to.scale);
    }
  }

  const BackwardParams& bp_;
  const Params& p_;
  const WorkPlan& plan_;
  BackwardPlan cut_;
  int64_t group_, rows_per_pair_, q_tiles_;
  const Bf16BackwardKernels* bf16_;  // the bfloat16 products' backward, or nullptr
  QueryStage<T> query_;
  void (*step_)(const BackwardStep<T>&) = nullptr;
  void (*pack_)(const T*, int64_t, int64_t, int64_t, T*, int64_t) = nullptr;
  TileStep<T> proto_{};
  T dk_scale_ = 1;
  GradientType dq_type_{}, dk_type_{}, dv_type_{};
  bool dq_in_place_ = false;
  int64_t dout_ld_ = 0;  // elements between a tile's dout rows read in place; 0: copied
};

// No query at all (Hq or Lq = 0): every key's dK and dV is 0.
template <typename T>
void zero_key_gradients(const BackwardParams& bp, const KernelSet& kernels) {
  const Params& p = bp.fwd;
  const size_t nb = p.batch_shape.size();
  int64_t batch = 1;
  for (int64_t n : p.batch_shape) batch *= n;
  const int64_t dk_item = gradient_type<T>(bp.dk_dtype, kernels).item;
  const int64_t dv_item = gradient_type<T>(bp.dv_dtype, kernels).item;
  for (const auto& [to, width, item] :
       {std::tuple{&bp.dk, p.d, dk_item}, std::tuple{&bp.dv, p.dv, dv_item}}) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t hk = 0; hk < p.hkv; ++hk) {
        char* head = static_cast<char*>(const_cast<void*>(to->data)) +
                     (batch_offset(p.batch_shape, *to, b) + hk * to->strides[nb]) * item;
        for (int64_t j = 0; j < p.lk; ++j) {
          std::memset(head + j * to->strides[nb + 1] * item, 0, width * item);
        }
      }
    }
  }
}

template <typename T>
void run_backward(const BackwardParams& bp, const KernelSet& kernels) {
  const Params& p = bp.fwd;
  if (p.hkv == 0) return;
  if (p.hq == 0 || p.lq == 0) {
    zero_key_gradients<T>(bp, kernels);
    return;
  }
  const WorkPlan plan(p);
  if (plan.items() == 0) return;
  const BackwardPlan cut = plan_backward<T>(plan, p);
  const BackwardDriver<T> driver(bp, kernels, plan, cut);
  const int64_t tasks = cut.tasks(), q_tiles = cut.pairs * driver.q_tiles();
  const int64_t key_tiles = cut.row_blocks > 1 ? cut.pairs * driver.key_tiles() : 0;

  const CallInFlight call;
  const int64_t wanted = threads_for_call(p.num_threads, call.count());
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min(wanted, tasks)));
  // Allocated before the parallel region, where nothing allocates or throws (attention.cpp).
  ThreadScratch<BackwardScratch<T>> scratch(threads);
  for (int t = 0; t < threads; ++t) {
    scratch.add(p, driver.q_tiles(), driver.bf16_products(), cut.block_tiles);
  }
  // The tile unit's configuration (AMX) is per thread: set before its first step, released after.
  void (*amx_begin)() = driver.bf16_products() ? kernels.amx_begin : nullptr;
  void (*amx_end)() = driver.bf16_products() ? kernels.amx_end : nullptr;
  // Partials, each zeroed by the task that writes it where the sums read it.
  const AlignedBuffer<T> dq_parts(
      driver.dq_in_place() ? 0 : cut.chunks * cut.pairs * driver.dq_elems());
  const int64_t kv_parts = cut.row_blocks > 1 ? cut.row_blocks * cut.pairs : 0;
  const AlignedBuffer<T> dk_parts(kv_parts * driver.dk_elems()),
      dv_parts(kv_parts * driver.dv_elems());

#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    BackwardScratch<T>& sc = scratch[omp_get_thread_num()];
    if (amx_begin) amx_begin();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      driver.run_task(task, sc, dq_parts.data(), dk_parts.data(), dv_parts.data());
    }
    if (amx_end) amx_end();
#pragma omp for schedule(static) nowait
    for (int64_t tile = 0; tile < q_tiles; ++tile) driver.finish_dq(tile, dq_parts.data());
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < key_tiles; ++tile) {
      driver.finish_dkv(tile, dk_parts.data(), dv_parts.data());
    }
  }
#else
  if (amx_begin) amx_begin();
  for (int64_t task = 0; task < tasks; ++task) {
    driver.run_task(task, scratch[0], dq_parts.data(), dk_parts.data(), dv_parts.data());
  }
  if (amx_end) amx_end();
  for (int64_t tile = 0; tile < q_tiles; ++tile) driver.finish_dq(tile, dq_parts.data());
  for (int64_t tile = 0; tile < key_tiles; ++tile) {
    driver.finish_dkv(tile, dk_parts.data(), dv_parts.data());
  }
#endif
}

}  // namespace

void attention_backward(const BackwardParams& p) {
  if (p.fwd.cu_seqlens_q || p.fwd.cu_seqlens_k || p.fwd.additive_w) {
    throw std::invalid_argument("attention_backward: no packed sequences or additive scores");
  }
  const KernelSet& kernels = active_kernels();
  if (p.fwd.compute_dtype == DType::F32) {
    run_backward<float>(p, kernels);
  } else {
    run_backward<double>(p, kernels);
  }
}

}  // namespace cpuattn
