// The work plan of one call: which work items there are and where each lies, how split-KV
// cuts their keys, how items group into tasks, and what a task prefetches for the next one.
// Computed from the shape (and kv_lengths, cu_seqlens) only, never the thread count, except
// the task grouping, which changes no result: so results are bitwise identical for any
// number of threads.
#pragma once
#include <cstdint>
#include <vector>

#include "attention.h"
#include "mask.h"
#include "tiles.h"

namespace cpuattn {

// Bytes per element of a storage type.
inline int64_t dtype_bytes(DType t) {
  return t == DType::F64 ? 8 : t == DType::F32 ? 4 : t == DType::I8 ? 1 : 2;
}

// Element offset of batch entry `b` (row-major over batch_shape) in a view.
inline int64_t batch_offset(const std::vector<int64_t>& shape, const View& view, int64_t b) {
  int64_t off = 0;
  for (size_t dim = shape.size(); dim-- > 0;) {
    off += (b % shape[dim]) * view.strides[dim];
    b /= shape[dim];
  }
  return off;
}

// One work item: a query tile of one (batch entry, kv head). Its rows are (query position,
// head in the GQA group) pairs, ordered by position, so one K/V tile serves every query head
// of the group.
struct ItemPos {
  int64_t b, hk, q_tile;
  int64_t lq, lk;        // this batch entry's query and key counts (before kv_lengths)
  int64_t q_row, k_row;  // its first row in q / out / lse and in k / v (varlen), else 0
                         // (paged: k_row stands for nothing, the layout ignores it)
  int64_t rows_per_head_group;
  int64_t r0, rows;  // the tile's rows: [r0, r0 + rows) of the head group's
};

// Where a task's q, K, V and out lie, as rows of whole cache lines (rows 0: not asked for),
// for TileStep::prefetch.
struct TaskRanges {
  const char* at[kPrefetchRanges] = {};
  int64_t row_lines[kPrefetchRanges] = {}, stride[kPrefetchRanges] = {};
  int64_t rows[kPrefetchRanges] = {};
};

class WorkPlan {
 public:
  // packed_pairs_cheap: the kernels multiply packed bfloat16 pairs with vdpbf16ps and have no
  // AMX tiles (rows_in_place).
  explicit WorkPlan(const Params& p, bool packed_pairs_cheap = false);

  int64_t items() const { return items_; }
  int64_t batch() const { return batch_; }  // batch entries (packed sequences: B)
  int64_t group() const { return group_; }  // query heads per kv head
  // Rows per (batch, kv head) pair: Lq x group; for packed varlen sequences, the packed
  // total x group (QueryStage's row stride test relies on it).
  int64_t rows_per_head_group() const { return rows_per_head_group_; }
  bool varlen() const { return p_.cu_seqlens_q != nullptr; }
  // Query tiles per (batch, kv head) pair; 0 when they differ (packed varlen sequences).
  int64_t query_tiles_per_head() const { return seqs_.empty() ? q_tiles_ : 0; }
  // Decode, and short sequences at large head dims: one query tile per head (no packed K
  // tile to reuse) of a few rows, so K and V are best read in place, row by row, as they lie
  // (kInPlaceMaxRows, kInPlaceDimsPerRow).
  bool rows_in_place() const {
    const int64_t rows = rows_per_head_group();
    const bool by_dims =
        p_.kv_dtype == DType::F32 ||
        (packed_pairs_cheap_ && p_.kv_dtype == DType::BF16 && p_.q_dtype == DType::BF16);
    return query_tiles_per_head() == 1 && rows <= kInPlaceMaxRows &&
           (!by_dims || rows * kInPlaceDimsPerRow <= p_.d);
  }
  // Keys of the longest sequence (the largest kv_lengths entry): what a thread's packed-K
  // cache must hold.
  int64_t max_keys() const { return max_keys_; }
  // Keys any item may see: the largest kv_lengths entry, else Lk (packed varlen: the packed
  // total, unused: varlen never splits).
  int64_t valid_keys() const { return valid_keys_; }
  // The keys split-KV cuts: the most tiles any item visits, in keys (KeyTiles::tiles: a
  // window's tiles and those of global keys, not the whole cache), computed where split-KV may
  // apply (few items), else valid_keys(); so a batch entry's split may depend on the options
  // and the other entries too (never on the threads).
  int64_t split_keys() const { return split_keys_; }
  // Rows of the largest query tile: the size of one split-KV partial result, in rows.
  int64_t max_tile_rows() const;

  ItemPos locate(int64_t item) const;
  // The keys each row of the item's batch entry may see (causal, window, kv_lengths).
  RowBounds row_bounds(const ItemPos& pos) const;
  // The q, K, V and out of the whole-head task starting at `item`, for the task before it to
  // prefetch; empty when the head is too large or not laid out in a few runs.
  TaskRanges head_ranges(int64_t item) const;
  // Whether decode steps a batch entry's kv heads in lockstep: K keeps each position's kv
  // heads side by side, closer than consecutive positions of one head ((B, L, H, D) views),
  // or K is a paged cache, whatever the order inside its blocks (blocks holding their heads
  // one after the other, PagedKVCache's, decoded at 0.94x the contiguous cache's speed in
  // lockstep and at 0.65x head by head: measured on Zen 4).
  bool heads_side_by_side() const;

 private:
  // Packed sequences: one entry per non-empty sequence, longest (most work) first, with the
  // index of its first work item.
  struct Sequence {
    int64_t b, lq, lk, tiles, first_item;
  };
  void plan_sequences();

  const Params& p_;
  bool packed_pairs_cheap_;
  int64_t batch_ = 1, group_ = 0, rows_per_head_group_ = 0, q_tiles_ = 0, items_ = 0;
  int64_t max_keys_ = 0, valid_keys_ = 0, split_keys_ = 0;
  std::vector<Sequence> seqs_;  // packed varlen sequences only
};

// How the items go out as tasks: split-KV chunks of each item's keys (few items: decode), or
// whole heads (many small heads), or one item per task.
struct TaskPlan {
  // Split-KV: each item's keys are cut into `chunks` tile-aligned ranges of chunk_keys keys,
  // computed independently and merged in chunk order. 1: no split.
  int64_t chunks = 1, chunk_keys = 0;
  // Items per task: all query tiles of one (batch, kv head) pair (whole heads), or 1.
  int64_t items_per_task = 1;
  // Whole heads (items_per_task query tiles each, one too): tasks run in TaskRuns, each
  // prefetching its successor's q, K, V and out (WorkPlan::head_ranges). A head of one query
  // tile (sentences of up to 64 tokens, decode over short caches) gains as much as one of
  // several: without it such a head started with its q and out rows cold.
  bool whole_heads = false;
  // Decode over a cache that keeps each position's kv heads side by side (a paged cache, a
  // (B, L, H, D) buffer): a task takes the items of this many kv heads of one batch entry
  // (a divisor of Hkv; one query tile each) and steps them in lockstep, key tile by key tile,
  // so that it reads whole positions rather than one head's rows far apart (half the
  // bandwidth, measured). Each item is computed as alone: the same bits. 1: one item a task.
  int64_t heads_per_task = 1;
  int64_t tasks = 0;

  KeyChunk chunk(int64_t c) const { return {c * chunk_keys, (c + 1) * chunk_keys}; }
  // The first item of task `task`, for tasks of one item, of items_per_task or of
  // heads_per_task items (its chunk, with split-KV: task % chunks).
  int64_t first_item(int64_t task) const {
    return chunks > 1 ? task / chunks * heads_per_task : task * items_per_task * heads_per_task;
  }
};

// wanted_threads decides the whole-head grouping only: the chunking depends on the shape, the
// options and kv_lengths alone.
TaskPlan plan_tasks(const WorkPlan& plan, int64_t wanted_threads);

}  // namespace cpuattn
