// The driver: splits the problem into (batch, kv head, query tile) work items, runs them on
// OpenMP threads, and feeds each one key tile at a time to the active micro-kernel.
// Each work item is computed the same way whichever thread runs it, so results are bitwise
// identical for any thread count.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "aligned_buffer.h"
#include "convert.h"
#include "kernels/kernel.h"
#include "mask.h"
#include "threads.h"
#include "tiles.h"

namespace cpuattn {
namespace {

// Element offset of batch entry `b` (row-major over batch_shape) in a view.
int64_t batch_offset(const std::vector<int64_t>& shape, const View& view, int64_t b) {
  int64_t off = 0;
  for (size_t dim = shape.size(); dim-- > 0;) {
    off += (b % shape[dim]) * view.strides[dim];
    b /= shape[dim];
  }
  return off;
}

// Bytes per element of a storage type.
int64_t dtype_bytes(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

// Where a task's q, K, V and out lie, as rows of whole cache lines (rows 0: not asked for),
// for TileStep::prefetch.
struct TaskRanges {
  const char* at[kPrefetchRanges] = {};
  int64_t row_lines[kPrefetchRanges] = {}, stride[kPrefetchRanges] = {};
  int64_t rows[kPrefetchRanges] = {};
};

// Tiles of one (batch, kv head) prepared once and reused by the later query tiles of that
// head: packed K^T, or V converted from half. Without caching (one query tile, as in decode,
// or past the element cap) a tile is prepared into the caller's spare buffer every time.
// Neither buffer is initialized: a tile is read only once its ready flag is set, and the flags
// are cleared on the first use (owner_ starts at -1) and whenever the owner changes.
template <typename T>
class TileCache {
 public:
  void reserve(int64_t tiles, int64_t tile_elems, bool enable) {
    tile_elems_ = tile_elems;
    // Division, not tiles * tile_elems: with a huge Lk (a zero-stride K) the product overflows.
    if (enable && tile_elems > 0 && tiles <= kMaxPackedKeyElems / tile_elems) {
      data_.allocate(tiles * tile_elems);
      ready_.allocate(tiles);
    }
  }

  template <typename Fill>
  const T* get(int64_t owner, int64_t tile, T* spare, const Fill& fill) {
    if (ready_.size() == 0) {
      fill(spare);
      return spare;
    }
    if (owner != owner_) {
      std::fill(ready_.data(), ready_.data() + ready_.size(), uint8_t(0));
      owner_ = owner;
    }
    T* dst = data_.data() + tile * tile_elems_;
    if (!ready_[tile]) {
      fill(dst);
      ready_[tile] = 1;
    }
    return dst;
  }

 private:
  AlignedBuffer<T> data_;
  AlignedBuffer<uint8_t> ready_;
  int64_t owner_ = -1;  // b * Hkv + kv head, or -1
  int64_t tile_elems_ = 0;
};

// How K and V reach the kernel: in the compute type, converted from half to float32, or as
// bfloat16 pairs for the kernels' bfloat16 dot products.
enum class Operands { Native, Converted, Bf16Pairs };

// Width of a packed bfloat16 V row: Dv rounded up to whole 16-lane vectors.
int64_t bf16_values_width(int64_t dv) { return (dv + 15) / 16 * 16; }

// Per-thread buffers, sized once per call before the parallel region: O(tile) plus the capped
// tile caches, never O(Lq x Lk). Uninitialized (AlignedBuffer): each is written before it is
// read, by the thread that owns it. Each buffer starts on a cache line, and so does the struct
// (its own fields, q_first and the caches' owners, change per item): no line is written by
// two threads.
template <typename T>
struct alignas(64) Scratch {
  AlignedBuffer<T> q, kt, vt, stage, s, o, m, l, sums;
  AlignedBuffer<T*> out_rows;  // per row: where its output goes, when out has the compute type
  int64_t q_first = 0;         // element offset of the tile's first q row
  AlignedBuffer<KeyRange> bounds;
  AlignedBuffer<const void*> mask_rows;
  AlignedBuffer<int64_t> row_pos, row_head, diag;
  AlignedBuffer<T> slopes;
  AlignedBuffer<T> merged;  // merge_item's sums for one row (Dv)
  TileCache<T> keys, values;
  AlignedBuffer<uint32_t> q_hi, q_lo, kt2, v2;  // Operands::Bf16Pairs only
  TileCache<uint32_t> keys2, values2;

  // cache: worth it only when several query tiles read the same keys; with one (decode) the
  // cache would only add first-touch page faults. Converted K/V go through `stage` (K, before
  // packing) and `vt` (V).
  // pairs: D's bfloat16 pairs, padded as the kernel needs (Operands::Bf16Pairs only).
  Scratch(int64_t d, int64_t dv, int64_t lk, bool cache, Operands how, int64_t pairs)
      : q(kTileRows * d), kt(d * kTileKeys), s(kTileRows * kTileKeys), o(kTileRows * dv),
        m(kTileRows), l(kTileRows * kSumSlots), sums(kTileRows), out_rows(kTileRows),
        bounds(kTileRows), mask_rows(kTileRows), row_pos(kTileRows), row_head(kTileRows),
        diag(kTileRows), slopes(kTileRows), merged(dv) {
    const int64_t tiles = (lk + kTileKeys - 1) / kTileKeys;
    if (how == Operands::Bf16Pairs) {
      const int64_t v_elems = kTileKeys / 2 * bf16_values_width(dv);
      q_hi.allocate(kTileRows * pairs);
      q_lo.allocate(kTileRows * pairs);
      kt2.allocate(pairs * kTileKeys);
      v2.allocate(v_elems);
      keys2.reserve(tiles, pairs * kTileKeys, cache);
      values2.reserve(tiles, v_elems, cache);
      return;
    }
    keys.reserve(tiles, kTileKeys * d, cache);
    if (how == Operands::Converted) {
      vt.allocate(kTileKeys * dv);
      stage.allocate(kTileKeys * d);
      values.reserve(tiles, kTileKeys * dv, cache);
    }
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

template <typename T>
class Driver {
 public:
  using Pack = void (*)(const T*, int64_t, int64_t, int64_t, T*);
  using Convert = void (*)(const uint16_t*, int64_t, int64_t, int64_t, float*);
  // convert: the ISA's half -> float row conversion for p.kv_dtype (float compute only).
  // pairs: D's bfloat16 pairs padded for the kernel, on_tiles: `step` is the AMX step
  // (Operands::Bf16Pairs).
  Driver(const Params& p, const KernelSet& kernels, Operands how, int64_t pairs, bool on_tiles,
         void (*step)(const TileStep<T>&), Pack pack, Convert convert)
      : p_(p), kernels_(kernels), how_(how), pairs_(pairs), step_(step), pack_(pack),
        convert_(convert) {
    if constexpr (std::is_same_v<T, float>) {
      scale_ = kernels.scale_f32;
      finish_ = kernels.finish_f32;
    } else {
      scale_ = kernels.scale_f64;
      finish_ = kernels.finish_f64;
    }
    batch_ = 1;
    for (int64_t n : p.batch_shape) batch_ *= n;
    group_ = p.hq / p.hkv;
    rows_per_head_group_ = p.lq * group_;
    tiles_ = (rows_per_head_group_ + kTileRows - 1) / kTileRows;
    items_ = batch_ * p.hkv * tiles_;
    if (p.cu_seqlens_q) plan_sequences();
    // AMX can take K rows as they are when each K/V tile is used once (a single query tile
    // per head: no packed tile to reuse), D fills whole 32-element chunks and rows go forward.
    const size_t nb = p.batch_shape.size();
    const bool uniform = seqs_.empty();
    keys_in_place_ =
        uniform && on_tiles && tiles_ == 1 && p.d % (2 * kAmxPairs) == 0 && p.k.strides[nb + 1] > 0;
    // Float K rows are read in place (scores as dot products) for a few query rows per head
    // with no later query tile to reuse a packed K^T.
    const bool few_rows = uniform && tiles_ == 1 && rows_per_head_group_ <= kInPlaceMaxRows;
    float_keys_in_place_ = how != Operands::Bf16Pairs && few_rows && !p.additive_w;
    // The bfloat16 dot-product step reads K and V rows in place for as few rows.
    bf16_rows_in_place_ = how == Operands::Bf16Pairs && !on_tiles && few_rows;
    // score_rows reads q rows in place (and scales the scores) when a tile's rows are a
    // constant stride apart in the compute type: no copy-and-scale per row.
    const int64_t head_stride = p.q.strides[nb], pos_stride = p.q.strides[nb + 1];
    if (how == Operands::Native || how == Operands::Converted) {
      if (group_ == 1) {
        q_ld_ = pos_stride;
      } else if (rows_per_head_group_ <= group_ || pos_stride == group_ * head_stride) {
        q_ld_ = head_stride;
      }
    }
    q_in_place_ = q_ld_ != 0 && p.q_dtype == p.dtype && !float_keys_in_place_ && !p.additive_w;
  }

  int64_t work_items() const { return items_; }
  // Query tiles per (batch, kv head) pair; 0 when they differ (packed varlen sequences).
  int64_t query_tiles_per_head() const { return seqs_.empty() ? tiles_ : 0; }
  // Keys of the longest sequence: what a thread's packed-K cache must hold.
  int64_t max_keys() const { return max_keys_; }

  // Where a work item is. Items run head by head (so a thread's packed keys stay valid), and
  // within a head from the last query tile down: causal costs grow with the tile, and the
  // dynamic schedule balances best when the big items go first and the small ones fill in
  // at the end. Packed sequences go longest first for the same reason.
  struct ItemPos {
    int64_t b, hk, tile;
    int64_t lq, lk;          // this batch entry's query and key counts (before kv_lengths)
    int64_t q_row, k_row;    // its first row in q / out / lse and in k / v (varlen), else 0
    int64_t rows_per_head_group;
  };
  ItemPos locate(int64_t item) const {
    if (seqs_.empty()) {
      return {item / (tiles_ * p_.hkv),
              (item / tiles_) % p_.hkv,
              tiles_ - 1 - item % tiles_,
              p_.lq,
              p_.lk,
              0,
              0,
              rows_per_head_group_};
    }
    const auto next =
        std::upper_bound(seqs_.begin(), seqs_.end(), item,
                         [](int64_t i, const Sequence& s) { return i < s.first_item; });
    const Sequence& s = *(next - 1);
    const int64_t local = item - s.first_item;
    return {s.b,  local / s.tiles,      s.tiles - 1 - local % s.tiles, s.lq,
            s.lk, p_.cu_seqlens_q[s.b], p_.cu_seqlens_k[s.b],          s.lq * group_};
  }

  // The q, K, V and out of the whole-head task starting at `item`, for the previous task to
  // prefetch: short heads (MiniLM: 16 KiB per operand) are read in bursts too short for the
  // hardware prefetchers, and a cold head's loads and stores stalled ~10% of the time. An
  // operand is a block of `heads` x `rows` rows of `width` elements; it is prefetched when
  // one of those two levels is contiguous (a (B, H, L, D) array, or a (B, L, H, D) view:
  // a MiniLM batch of such views takes 0.85x the time with it), and only heads of at most
  // kPrefetchHeadBytes in all; longer streams are left to the hardware. (A read prefetch of
  // out suffices: a line no other core holds arrives exclusive, and the store needs no second
  // request.)
  TaskRanges head_ranges(int64_t item) const {
    TaskRanges in;
    const ItemPos pos = locate(item);
    const size_t nb = p_.batch_shape.size();
    int64_t bytes = 0;
    const auto range = [&](const View& view, DType type, int64_t first_head, int64_t heads,
                           int64_t rows, int64_t width, int slot) {
      const int64_t item_bytes = dtype_bytes(type);
      const int64_t head_stride = view.strides[nb], row_stride = view.strides[nb + 1];
      int64_t runs, run, stride;  // elements: runs of `run` contiguous, `stride` apart
      if (row_stride == width && (heads == 1 || head_stride == rows * width)) {
        runs = 1, run = heads * rows * width, stride = 0;
      } else if (row_stride == width) {
        runs = heads, run = rows * width, stride = head_stride;
      } else if (heads == 1 || head_stride == width) {
        runs = rows, run = heads * width, stride = row_stride;
      } else {
        return;
      }
      const int64_t first = batch_offset(p_.batch_shape, view, pos.b) + first_head * head_stride;
      const auto start = reinterpret_cast<uintptr_t>(view.data) + first * item_bytes;
      const uintptr_t line = start & ~uintptr_t(63);
      in.at[slot] = reinterpret_cast<const char*>(line);
      // Lines a run touches: from its first element's line, plus one when runs start at
      // other offsets within a line (stride not a whole number of lines).
      const bool shifts = runs > 1 && (stride * item_bytes) % 64 != 0;
      in.row_lines[slot] = (start - line + run * item_bytes + 63) / 64 + (shifts ? 1 : 0);
      in.stride[slot] = stride * item_bytes;
      in.rows[slot] = runs;
      bytes += runs * run * item_bytes;
    };
    range(p_.q, p_.q_dtype, pos.hk * group_, group_, pos.lq, p_.d, 0);
    range(p_.k, p_.kv_dtype, pos.hk, 1, pos.lk, p_.d, 1);
    range(p_.v, p_.kv_dtype, pos.hk, 1, pos.lk, p_.dv, 2);
    range(p_.out, p_.out_dtype, pos.hk * group_, group_, pos.lq, p_.dv, 3);
    if (bytes > kPrefetchHeadBytes) return {};
    return in;
  }

  // Rows of the largest query tile: the size of one split-KV partial result, in rows.
  int64_t max_tile_rows() const { return std::min(kTileRows, rows_per_head_group_); }
  // Elements of one partial result: per row m, l, then o (Dv).
  int64_t partial_elems() const { return max_tile_rows() * (p_.dv + 2); }

  // Rows are ordered (query position, head in group): one tile covers a few positions of all
  // heads that share the kv head, so each K/V tile is loaded once for the whole group.
  // Only keys in [chunk.begin, chunk.end) are visited; with `partial` set the unnormalized
  // state goes there for merge_item, else the finished rows go to out / lse. `next`: the
  // next task's ranges, of which this item, part `part` of `parts` of its task, prefetches
  // that share over its key tiles.
  void run_item(int64_t item, Scratch<T>& sc, KeyChunk chunk = {0, INT64_MAX}, T* partial = nullptr,
                const TaskRanges* next = nullptr, int64_t part = 0, int64_t parts = 1) const {
    const ItemPos pos = locate(item);
    const int64_t b = pos.b, hk = pos.hk;

    const int64_t n_keys =
        p_.kv_lengths.data ? static_cast<const int64_t*>(
                                 p_.kv_lengths.data)[batch_offset(p_.batch_shape, p_.kv_lengths, b)]
                           : pos.lk;
    const RowBounds rb{n_keys, p_.align == Align::BottomRight ? n_keys - pos.lq : 0, p_.causal,
                       p_.window_left, p_.window_right};

    const int64_t r0 = pos.tile * kTileRows;
    const int64_t rows = std::min(kTileRows, pos.rows_per_head_group - r0);
    pack_rows(pos, r0, rows, rb, sc);

    const int64_t i_first = sc.row_pos[0], i_last = sc.row_pos[rows - 1];
    const int64_t keys_lo = rb.of_row(i_first).lo, keys_hi = rb.of_row(i_last).hi;
    const size_t nb = p_.batch_shape.size();
    // Element offsets of this (batch, kv head) in K and V, whatever their storage type.
    const int64_t k_base = batch_offset(p_.batch_shape, p_.k, b) + hk * p_.k.strides[nb] +
                           pos.k_row * p_.k.strides[nb + 1];
    const int64_t v_base = batch_offset(p_.batch_shape, p_.v, b) + hk * p_.v.strides[nb] +
                           pos.k_row * p_.v.strides[nb + 1];
    const int64_t k_ld = p_.k.strides[nb + 1], v_ld = p_.v.strides[nb + 1];
    const bool half_kv = how_ == Operands::Converted;

    TileStep<T> step{};
    step.q = q_in_place_ ? static_cast<const T*>(p_.q.data) + sc.q_first : sc.q.data();
    step.q_ld = q_in_place_ ? q_ld_ : p_.d;
    step.q_in_place = q_in_place_;
    step.dot_scale = static_cast<T>(p_.scale);
    step.v_ld = half_kv ? p_.dv : v_ld;
    step.k_ld = k_ld;
    step.rows = rows;
    step.d = p_.d;
    step.dv = p_.dv;
    step.s = sc.s.data();
    step.o = sc.o.data();
    step.m = sc.m.data();
    step.l = sc.l.data();
    step.bounds = sc.bounds.data();
    step.mask_kind = p_.mask_kind;
    step.mask_rows = sc.mask_rows.data();
    step.mask_col_stride = p_.mask.data ? p_.mask.strides[nb + 2] : 0;
    step.softcap = static_cast<T>(p_.softcap);
    step.slopes = p_.alibi.data ? sc.slopes.data() : nullptr;
    step.diag = sc.diag.data();
    step.additive_w = static_cast<const T*>(p_.additive_w);
    if (how_ == Operands::Bf16Pairs) {
      step.q_hi = sc.q_hi.data();
      step.q_lo = p_.q_dtype == DType::BF16 ? nullptr : sc.q_lo.data();
      step.d_pairs = pairs_;
      step.v2_ld = bf16_values_width(p_.dv);
      step.split_p = p_.out_dtype != DType::BF16;  // full float32 accuracy for a float32 out
    }

    // Key tiles start at multiples of kTileKeys so packed tiles can be shared by query tiles;
    // keys of the first tile below keys_lo are dropped by the Partial-tile bounds.
    const int64_t owner = b * p_.hkv + hk;
    const int64_t j_end = std::min(keys_hi, chunk.end);
    const int64_t j_first = std::max(keys_lo / kTileKeys * kTileKeys, chunk.begin);
    const int64_t key_tiles = (j_end - j_first + kTileKeys - 1) / kTileKeys;
    for (int64_t j0 = j_first; j0 < j_end; j0 += kTileKeys) {
      const int64_t j1 = std::min(j0 + kTileKeys, j_end);
      const TileKind kind = classify_tile(rb, i_first, i_last, j0, j1);
      if (kind == TileKind::Skip) continue;
      const int64_t share = part * key_tiles + (j0 - j_first) / kTileKeys;
      const int64_t shares = parts * key_tiles;
      for (int i = 0; next && i < kPrefetchRanges; ++i) {  // share-th of shares, whole lines
        const int64_t lines = next->rows[i] * next->row_lines[i];
        const int64_t lo = share * lines / shares, hi = (share + 1) * lines / shares;
        step.prefetch[i] = {next->at[i], next->row_lines[i], next->stride[i], lo, hi - lo};
      }
      // Pack the whole valid tile (up to n_keys) so every query tile can reuse it.
      const int64_t packed_cols = std::min(kTileKeys, n_keys - j0);
      step.cols = j1 - j0;
      step.j0 = j0;
      step.apply_bounds = kind == TileKind::Partial;
      if (how_ == Operands::Bf16Pairs) {
        const auto* k16 = static_cast<const uint16_t*>(p_.k.data) + k_base + j0 * k_ld;
        const auto* v16 = static_cast<const uint16_t*>(p_.v.data) + v_base + j0 * v_ld;
        if (bf16_rows_in_place_) {
          step.k_rows = k16;
          step.v_rows = v16;
          step.prefetch_next = j1 < j_end;
          step_(step);
          continue;
        }
        // Decode on tiles: K rows read in place when a whole tile lies inside the array.
        const bool in_place = keys_in_place_ && j0 + kTileKeys <= p_.lk;
        step.k_rows = in_place ? k16 : nullptr;
        if (!in_place) {
          step.kt2 = sc.keys2.get(owner, j0 / kTileKeys, sc.kt2.data(), [&](uint32_t* dst) {
            kernels_.pack_bf16_keys(k16, k_ld, packed_cols, p_.d, pairs_, dst);
          });
        }
        step.v2 = sc.values2.get(owner, j0 / kTileKeys, sc.v2.data(), [&](uint32_t* dst) {
          kernels_.pack_bf16_values(v16, v_ld, packed_cols, p_.dv, step.v2_ld, dst);
        });
        step_(step);
        continue;
      }
      if (float_keys_in_place_ && half_kv) {  // decode on a half cache: widened as read
        step.k_rows = static_cast<const uint16_t*>(p_.k.data) + k_base + j0 * k_ld;
        step.v_rows = static_cast<const uint16_t*>(p_.v.data) + v_base + j0 * v_ld;
        step.v_ld = v_ld;
        step.half_f16 = p_.kv_dtype == DType::F16;
        step.prefetch_next = j1 < j_end;
        step_(step);
        continue;
      }
      if (float_keys_in_place_) {
        step.k = static_cast<const T*>(p_.k.data) + k_base + j0 * k_ld;
        step.prefetch_next = j1 < j_end;
      } else {
        step.kt = sc.keys.get(owner, j0 / kTileKeys, sc.kt.data(), [&](T* dst) {
          if (!half_kv) {
            pack_(static_cast<const T*>(p_.k.data) + k_base + j0 * k_ld, k_ld, packed_cols, p_.d,
                  dst);
            return;
          }
          convert_rows(p_.k.data, k_base + j0 * k_ld, k_ld, packed_cols, p_.d, sc.stage.data());
          pack_(sc.stage.data(), p_.d, packed_cols, p_.d, dst);
        });
      }
      if (half_kv) {
        step.v = sc.values.get(owner, j0 / kTileKeys, sc.vt.data(), [&](T* dst) {
          convert_rows(p_.v.data, v_base + j0 * v_ld, v_ld, packed_cols, p_.dv, dst);
        });
      } else {
        step.v = static_cast<const T*>(p_.v.data) + v_base + j0 * v_ld;
      }
      step_(step);
    }
    if (partial) {
      write_partial(rows, sc, partial);
    } else {
      write_rows(pos, rows, sc);
    }
  }

  // Combines an item's chunk results (run_item with `partial`), in chunk order, into out and
  // lse: the arithmetic of cpuattn.merge. A chunk with no kept key, or whose weight rounds to
  // exactly 0, contributes nothing. acc: Dv elements of scratch.
  void merge_item(int64_t item, const T* partials, int64_t chunks, T* acc) const {
    const ItemPos pos = locate(item);
    const int64_t hk = pos.hk;
    const int64_t r0 = pos.tile * kTileRows;
    const int64_t rows = std::min(kTileRows, pos.rows_per_head_group - r0);
    const int64_t stride = partial_elems(), dv = p_.dv;
    const OutBase base = out_base(pos);
    for (int64_t r = 0; r < rows; ++r) {
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
      const int64_t i = (r0 + r) / group_, h = hk * group_ + (r0 + r) % group_;
      write_out_row(base, i, h, acc, l);
      write_lse(base, i, h, m, l);
    }
  }

 private:
  // Copies the tile's query rows, times the scale, and records each row's keys and mask row.
  void pack_rows(const ItemPos& pos, int64_t r0, int64_t rows, const RowBounds& rb,
                 Scratch<T>& sc) const {
    const int64_t b = pos.b, hk = pos.hk;
    const size_t nb = p_.batch_shape.size();
    const int64_t q_base = batch_offset(p_.batch_shape, p_.q, b) + pos.q_row * p_.q.strides[nb + 1];
    const int64_t mask_base = p_.mask.data ? batch_offset(p_.batch_shape, p_.mask, b) : 0;
    const T scale = static_cast<T>(p_.scale);
    // Per row: its query position and head, keys and diagonal, and no running max yet. Row
    // r0 + r is query i of head hk * group + g, stepped without a division per row. Locals
    // throughout: the compiler cannot keep p_'s fields in registers across the stores.
    int64_t* row_pos = sc.row_pos.data();
    int64_t* row_head = sc.row_head.data();
    int64_t i = r0 / group_, g = r0 % group_;
    const int64_t group = group_;
    for (int64_t r = 0; r < rows; ++r, g = g + 1 == group ? 0 : g + 1, i += g == 0) {
      row_pos[r] = i;
      row_head[r] = hk * group + g;
      sc.bounds[r] = rb.of_row(i);
      sc.diag[r] = i + rb.offset;
      sc.m[r] = -std::numeric_limits<T>::infinity();
    }
    const int64_t q_head_stride = p_.q.strides[nb], q_pos_stride = p_.q.strides[nb + 1];
    sc.q_first = q_base + row_head[0] * q_head_stride + row_pos[0] * q_pos_stride;
    if (how_ == Operands::Bf16Pairs || !q_in_place_) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t src = q_base + row_head[r] * q_head_stride + row_pos[r] * q_pos_stride;
        if (how_ == Operands::Bf16Pairs) {
          pack_query_pairs(src, r, sc);
        } else if (p_.q_dtype == p_.dtype) {
          scale_(static_cast<const T*>(p_.q.data) + src, scale, p_.d, sc.q.data() + r * p_.d);
        } else {
          T* dst = sc.q.data() + r * p_.d;
          for (int64_t e = 0; e < p_.d; ++e) {
            dst[e] = load_as<T>(p_.q.data, p_.q_dtype, src + e) * scale;
          }
        }
      }
    }
    if (p_.alibi.data) {
      const T* slopes =
          static_cast<const T*>(p_.alibi.data) + batch_offset(p_.batch_shape, p_.alibi, b);
      for (int64_t r = 0; r < rows; ++r) sc.slopes[r] = slopes[row_head[r] * p_.alibi.strides[nb]];
    }
    if (p_.mask.data) {
      const int64_t item = p_.mask_kind == MaskKind::Bool ? 1 : sizeof(T);
      const char* mask = static_cast<const char*>(p_.mask.data) + mask_base * item;
      const int64_t head_stride = p_.mask.strides[nb], pos_stride = p_.mask.strides[nb + 1];
      for (int64_t r = 0; r < rows; ++r) {
        sc.mask_rows[r] = mask + (row_head[r] * head_stride + row_pos[r] * pos_stride) * item;
      }
    }
    std::fill(sc.l.data(), sc.l.data() + rows * kSumSlots, T(0));
    std::fill(sc.o.data(), sc.o.data() + rows * p_.dv, T(0));
  }

  // Query row `r` as bfloat16 pairs, unscaled (the kernel scales the scores): a bfloat16 q
  // as it is, another q split into hi + lo (split_bf16); zero pairs past D.
  void pack_query_pairs(int64_t src, int64_t r, Scratch<T>& sc) const {
    if (pairs_ == 0) return;  // D = 0: no pairs, and no buffer to copy into (memcpy to null)
    uint32_t* hi = sc.q_hi.data() + r * pairs_;
    uint32_t* lo = sc.q_lo.data() + r * pairs_;
    std::fill(hi + p_.d / 2, hi + pairs_, 0u);
    std::fill(lo + p_.d / 2, lo + pairs_, 0u);
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

  // Rows [0, rows) of a half K or V, ld elements apart from element `first`, into dst
  // (rows x width, contiguous) in the compute type.
  void convert_rows(const void* base, int64_t first, int64_t ld, int64_t rows, int64_t width,
                    T* dst) const {
    if constexpr (std::is_same_v<T, float>) {
      convert_(static_cast<const uint16_t*>(base) + first, ld, rows, width, dst);
    } else {  // never called: the binding allows half storage only with float compute
      (void)base, (void)first, (void)ld, (void)rows, (void)width, (void)dst;
    }
  }

  // The tile's rows to out (and lse): an out in the compute type is written by the kernel's
  // finish along with the row sums, another type here from those sums.
  void write_rows(const ItemPos& pos, int64_t rows, Scratch<T>& sc) const {
    const OutBase base = out_base(pos);
    const bool direct = p_.out_dtype == p_.dtype;
    if (direct) {
      T* out = static_cast<T*>(const_cast<void*>(p_.out.data)) + base.out;
      const size_t nb = p_.batch_shape.size();
      const int64_t head_stride = p_.out.strides[nb], pos_stride = p_.out.strides[nb + 1];
      for (int64_t r = 0; r < rows; ++r) {
        sc.out_rows[r] = out + sc.row_head[r] * head_stride + sc.row_pos[r] * pos_stride;
      }
    }
    finish_(sc.o.data(), sc.l.data(), rows, p_.dv, direct ? sc.out_rows.data() : nullptr,
            sc.sums.data());
    if (direct && !p_.lse.data) return;
    for (int64_t r = 0; r < rows; ++r) {
      if (!direct) {
        write_out_row(base, sc.row_pos[r], sc.row_head[r], sc.o.data() + r * p_.dv, sc.sums[r]);
      }
      write_lse(base, sc.row_pos[r], sc.row_head[r], sc.m[r], sc.sums[r]);
    }
  }

  void write_partial(int64_t rows, Scratch<T>& sc, T* partial) const {
    finish_(sc.o.data(), sc.l.data(), rows, p_.dv, nullptr, sc.sums.data());
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = partial + r * (p_.dv + 2);
      dst[0] = sc.m[r];
      dst[1] = sc.sums[r];
      std::copy(sc.o.data() + r * p_.dv, sc.o.data() + (r + 1) * p_.dv, dst + 2);
    }
  }

  // Element offsets of an item's batch entry (and first row, for packed sequences) in out
  // and lse (lse: -1 when not requested), computed once per work item rather than per row.
  struct OutBase {
    int64_t out, lse;
  };
  OutBase out_base(const ItemPos& pos) const {
    const size_t nb = p_.batch_shape.size();
    return {batch_offset(p_.batch_shape, p_.out, pos.b) + pos.q_row * p_.out.strides[nb + 1],
            p_.lse.data
                ? batch_offset(p_.batch_shape, p_.lse, pos.b) + pos.q_row * p_.lse.strides[nb + 1]
                : -1};
  }

  // Packed sequences: one entry per non-empty sequence, longest (most work) first, with the
  // index of its first work item.
  struct Sequence {
    int64_t b, lq, lk, tiles, first_item;
  };
  void plan_sequences() {
    max_keys_ = 0;
    for (int64_t b = 0; b < batch_; ++b) {
      const int64_t lq = p_.cu_seqlens_q[b + 1] - p_.cu_seqlens_q[b];
      const int64_t lk = p_.cu_seqlens_k[b + 1] - p_.cu_seqlens_k[b];
      max_keys_ = std::max(max_keys_, lk);
      if (lq > 0) seqs_.push_back({b, lq, lk, (lq * group_ + kTileRows - 1) / kTileRows, 0});
    }
    std::stable_sort(seqs_.begin(), seqs_.end(), [](const Sequence& x, const Sequence& y) {
      return x.lq * std::max<int64_t>(x.lk, 1) > y.lq * std::max<int64_t>(y.lk, 1);
    });
    items_ = 0;
    for (Sequence& s : seqs_) {
      s.first_item = items_;
      items_ += s.tiles * p_.hkv;
    }
  }

  // out = o / l for query i of head h, in out's type; a row that kept no key (l = 0) gets 0.
  void write_out_row(const OutBase& at, int64_t i, int64_t h, const T* o, T l) const {
    void* out = const_cast<void*>(p_.out.data);
    const size_t nb = p_.batch_shape.size();
    const int64_t base = at.out + h * p_.out.strides[nb] + i * p_.out.strides[nb + 1];
    const T inv = l == T(0) ? T(0) : T(1) / l;  // NaN stays NaN
    if (p_.out_dtype == p_.dtype) {
      for (int64_t e = 0; e < p_.dv; ++e) static_cast<T*>(out)[base + e] = o[e] * inv;
    } else if (p_.out_dtype == DType::BF16) {  // one loop per type: no type test per element
      uint16_t* dst = static_cast<uint16_t*>(out) + base;
      for (int64_t e = 0; e < p_.dv; ++e) dst[e] = f32_to_bf16(float(o[e] * inv));
    } else {
      for (int64_t e = 0; e < p_.dv; ++e) store_as<T>(out, p_.out_dtype, base + e, o[e] * inv);
    }
  }

  // lse = m + log(l), when asked for; -inf for a row that kept no key.
  void write_lse(const OutBase& at, int64_t i, int64_t h, T m, T l) const {
    if (!p_.lse.data) return;
    const size_t nb = p_.batch_shape.size();
    T* lse = static_cast<T*>(const_cast<void*>(p_.lse.data)) + at.lse;
    lse[h * p_.lse.strides[nb] + i * p_.lse.strides[nb + 1]] =
        l == T(0) ? -std::numeric_limits<T>::infinity() : m + std::log(l);
  }

  const Params& p_;
  const KernelSet& kernels_;
  Operands how_;
  int64_t pairs_;
  bool keys_in_place_ = false;
  bool float_keys_in_place_ = false;
  bool bf16_rows_in_place_ = false;
  bool q_in_place_ = false;
  int64_t q_ld_ = 0;  // with q_in_place_: elements between a tile's q rows (0 = not constant)
  void (*step_)(const TileStep<T>&);
  Pack pack_;
  void (*scale_)(const T*, T, int64_t, T*);  // the ISA's y = x * a, for q rows
  void (*finish_)(const T*, const T*, int64_t, int64_t, T* const*, T*);  // the ISA's finish
  Convert convert_;
  int64_t batch_ = 0, group_ = 0, rows_per_head_group_ = 0, tiles_ = 0, items_ = 0;
  int64_t max_keys_ = p_.lk;
  std::vector<Sequence> seqs_;  // packed varlen sequences only
};

// Split-KV: how many key chunks each work item is cut into, from the shape alone (never the
// thread count, so results stay bitwise identical for any number of threads).
int64_t key_chunks(int64_t items, int64_t lk) {
  if (items >= kSplitBelowItems || lk <= kSplitMinChunkKeys) return 1;
  const int64_t by_keys = (lk + kSplitMinChunkKeys - 1) / kSplitMinChunkKeys;
  return std::max<int64_t>(1, std::min(by_keys, kSplitMaxItems / items));
}

template <typename T>
void run(const Params& p, const KernelSet& kernels, void (*step)(const TileStep<T>&),
         void (*pack)(const T*, int64_t, int64_t, int64_t, T*)) {
  if (p.hkv == 0 || p.hq == 0 || p.lq == 0) return;
  Operands how = p.kv_dtype == p.dtype ? Operands::Native : Operands::Converted;
  int64_t pairs = (p.d + 1) / 2;
  bool on_tiles = false;
  void (*tiles_begin)() = nullptr;
  void (*tiles_end)() = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (p.kv_dtype == DType::BF16 && !p.additive_w) {
      if (kernels.step_bf16_tiles && p.dv % 16 == 0) {
        how = Operands::Bf16Pairs;
        step = kernels.step_bf16_tiles;
        on_tiles = true;
        pairs = (pairs + kAmxPairs - 1) / kAmxPairs * kAmxPairs;
        tiles_begin = kernels.tiles_begin;
        tiles_end = kernels.tiles_end;
      } else if (kernels.step_bf16) {
        how = Operands::Bf16Pairs;
        step = kernels.step_bf16;
      }
    }
  }
  const Driver<T> driver(p, kernels, how, pairs, on_tiles, step, pack,
                         p.kv_dtype == DType::BF16 ? kernels.convert_bf16 : kernels.convert_f16);
  const int64_t items = driver.work_items();
  if (items == 0) return;

  // Few items (decode: B * Hkv of them) would leave cores idle: cut each item's keys into
  // `chunks` ranges of tile-aligned length, computed independently and merged in order.
  int64_t chunks = p.cu_seqlens_q ? 1 : key_chunks(items, p.lk);
  const int64_t chunk_keys = ((p.lk + chunks - 1) / chunks + kTileKeys - 1) / kTileKeys * kTileKeys;
  if (chunks > 1) chunks = (p.lk + chunk_keys - 1) / chunk_keys;

  const CallInFlight call;
  const int64_t wanted = threads_for_call(p.num_threads, call.count());
  // Many (batch, kv head) pairs per thread: a task runs all query tiles of one pair, so its
  // K^T tiles are packed once, not once per thread that gets one of its tiles. The results
  // are the same bits either way (every item is computed alike), so this may use `wanted`.
  const int64_t tiles_per_head = driver.query_tiles_per_head();  // 0: varlen, they differ
  const int64_t items_per_task = chunks == 1 && tiles_per_head > 0 &&
                                         items / tiles_per_head >= kWholeHeadTasksPerThread * wanted
                                     ? tiles_per_head
                                     : 1;
  const int64_t tasks = chunks > 1 ? items * chunks : items / items_per_task;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min(wanted, tasks)));

  // Allocate before the parallel region: an allocation failure must surface as an exception
  // here (MemoryError in Python), never inside OpenMP where it would terminate the process.
  // Nothing allocates or throws inside it.
  std::vector<Scratch<T>> scratch;
  scratch.reserve(threads);
  const bool cache_keys = driver.query_tiles_per_head() != 1;
  for (int t = 0; t < threads; ++t) {
    scratch.emplace_back(p.d, p.dv, driver.max_keys(), cache_keys, how, pairs);
  }
  // Every task writes its whole partial result before the merge reads it: not initialized.
  const AlignedBuffer<T> partials(chunks > 1 ? tasks * driver.partial_elems() : 0);

  // successor: the task this thread runs next, or -1: a whole-head task prefetches its data.
  const bool whole_heads = items_per_task > 1;
  auto run_task = [&](int64_t task, Scratch<T>& sc, int64_t successor = -1) {
    if (chunks == 1) {
      TaskRanges next;
      if (whole_heads && successor >= 0) next = driver.head_ranges(successor * items_per_task);
      for (int64_t part = 0; part < items_per_task; ++part) {
        driver.run_item(task * items_per_task + part, sc, {0, INT64_MAX}, nullptr, &next, part,
                        items_per_task);
      }
      return;
    }
    const int64_t chunk = task % chunks;
    driver.run_item(task / chunks, sc, {chunk * chunk_keys, (chunk + 1) * chunk_keys},
                    partials.data() + task * driver.partial_elems());
  };
  auto merge = [&](int64_t item, Scratch<T>& sc) {
    driver.merge_item(item, partials.data() + item * chunks * driver.partial_elems(), chunks,
                      sc.merged.data());
  };
  // Whole heads cost the same: runs of consecutive tasks (TaskRuns), the next run taken as the
  // last task of the current one starts, so that every task knows its successor.
  TaskRuns runs(tasks, threads);
  auto run_whole_heads = [&](Scratch<T>& sc) {
    int64_t begin, end, next_begin = 0, next_end = 0;
    bool more = runs.next(begin, end);
    while (more) {
      for (int64_t task = begin; task < end; ++task) {
        if (task + 1 == end) more = runs.next(next_begin, next_end);
        run_task(task, sc, task + 1 < end ? task + 1 : more ? next_begin : -1);
      }
      begin = next_begin;
      end = next_end;
    }
  };

#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    Scratch<T>& sc = scratch[omp_get_thread_num()];
    if (tiles_begin) tiles_begin();
    // Any schedule gives the same bits. Other than whole heads, dynamic: causal and windowed
    // items differ in cost.
    if (whole_heads) {
      run_whole_heads(sc);
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) run_task(task, sc);
    }
    if (tiles_end) tiles_end();
    if (chunks > 1) {
#pragma omp for schedule(static)
      for (int64_t item = 0; item < items; ++item) merge(item, sc);
    }
  }
#else
  if (tiles_begin) tiles_begin();
  if (whole_heads) {
    run_whole_heads(scratch[0]);
  } else {
    for (int64_t task = 0; task < tasks; ++task) run_task(task, scratch[0]);
  }
  if (tiles_end) tiles_end();
  for (int64_t item = 0; chunks > 1 && item < items; ++item) merge(item, scratch[0]);
#endif
}

}  // namespace

void attention(const Params& p) {
  const KernelSet& kernels = active_kernels();
  if (p.dtype == DType::F32) {
    run<float>(p, kernels, kernels.step_f32, kernels.pack_f32);
  } else {
    run<double>(p, kernels, kernels.step_f64, kernels.pack_f64);
  }
}

}  // namespace cpuattn
