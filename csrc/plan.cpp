#include "plan.h"

#include <algorithm>
#include <cstdlib>

namespace cpuattn {
namespace {

// Split-KV: how many key chunks each work item is cut into, from the shape alone (never the
// thread count, so results stay bitwise identical for any number of threads).
int64_t key_chunks(int64_t items, int64_t keys) {
  if (items >= kSplitBelowItems || keys <= kSplitMinChunkKeys) return 1;
  const int64_t by_keys = (keys + kSplitMinChunkKeys - 1) / kSplitMinChunkKeys;
  return std::max<int64_t>(1, std::min(by_keys, kSplitMaxItems / items));
}

}  // namespace

WorkPlan::WorkPlan(const Params& p, bool packed_pairs_cheap)
    : p_(p), packed_pairs_cheap_(packed_pairs_cheap) {
  for (int64_t n : p.batch_shape) batch_ *= n;
  group_ = p.hq / p.hkv;
  rows_per_head_group_ = p.lq * group_;
  q_tiles_ = (rows_per_head_group_ + kTileRows - 1) / kTileRows;
  items_ = batch_ * p.hkv * q_tiles_;
  max_keys_ = valid_keys_ = p.lk;
  if (p.cu_seqlens_q) plan_sequences();
  if (p.kv_lengths.data) {
    valid_keys_ = 0;
    const auto* lengths = static_cast<const int64_t*>(p.kv_lengths.data);
    for (int64_t b = 0; b < batch_; ++b) {
      valid_keys_ = std::max(valid_keys_, lengths[batch_offset(p.batch_shape, p.kv_lengths, b)]);
    }
    max_keys_ = valid_keys_;  // a paged table's capacity may be far beyond any sequence
  }
  split_keys_ = valid_keys_;
  if (items_ < kSplitBelowItems && seqs_.empty()) {
    split_keys_ = 0;
    for (int64_t item = 0; item < items_; ++item) {
      const ItemPos pos = locate(item);
      const KeyTiles tiles(row_bounds(pos), pos.r0 / group_, (pos.r0 + pos.rows - 1) / group_);
      split_keys_ = std::max(split_keys_, tiles.tiles() * kTileKeys);
    }
  }
}

void WorkPlan::plan_sequences() {
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

int64_t WorkPlan::max_tile_rows() const { return std::min(kTileRows, rows_per_head_group_); }

// Items run head by head (so a thread's packed keys stay valid), and within a head from the
// last query tile down: causal costs grow with the tile, and the dynamic schedule balances
// best when the big items go first and the small ones fill in at the end. Packed sequences go
// longest first for the same reason.
ItemPos WorkPlan::locate(int64_t item) const {
  ItemPos pos;
  if (seqs_.empty()) {
    pos = {item / (q_tiles_ * p_.hkv),
           (item / q_tiles_) % p_.hkv,
           q_tiles_ - 1 - item % q_tiles_,
           p_.lq,
           p_.lk,
           0,
           0,
           rows_per_head_group_,
           0,
           0};
  } else {
    const auto next =
        std::upper_bound(seqs_.begin(), seqs_.end(), item,
                         [](int64_t i, const Sequence& s) { return i < s.first_item; });
    const Sequence& s = *(next - 1);
    const int64_t local = item - s.first_item;
    pos = {s.b,
           local / s.tiles,
           s.tiles - 1 - local % s.tiles,
           s.lq,
           s.lk,
           p_.cu_seqlens_q[s.b],
           p_.cu_seqlens_k[s.b],
           s.lq * group_,
           0,
           0};
  }
  pos.r0 = pos.q_tile * kTileRows;
  pos.rows = std::min(kTileRows, pos.rows_per_head_group - pos.r0);
  return pos;
}

RowBounds WorkPlan::row_bounds(const ItemPos& pos) const {
  const int64_t n_keys =
      p_.kv_lengths.data
          ? static_cast<const int64_t*>(
                p_.kv_lengths.data)[batch_offset(p_.batch_shape, p_.kv_lengths, pos.b)]
          : pos.lk;
  const int64_t offset = p_.has_diagonal                  ? p_.diagonal
                         : p_.align == Align::BottomRight ? n_keys - pos.lq
                                                          : 0;
  return {n_keys, offset, p_.causal, p_.window_left, p_.window_right, {p_.globals, p_.n_globals}};
}

// Short heads (MiniLM: 16 KiB per operand) are read in bursts too short for the hardware
// prefetchers, and a cold head's loads and stores stalled ~10% of the time. An operand is a
// block of `heads` x `rows` rows of `width` elements; it is prefetched when one of those two
// levels is contiguous (a (B, H, L, D) array, or a (B, L, H, D) view: a MiniLM batch of such
// views takes 0.85x the time with it), and only heads of at most kPrefetchHeadBytes in all
// (longer streams are left to the hardware) and more than kPrefetchHeadMinBytes. (A read prefetch
// of out suffices: a line no other core holds arrives exclusive, and the store needs no second
// request.)
TaskRanges WorkPlan::head_ranges(int64_t item) const {
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
  if (!p_.paged.on) {  // a paged head lies in blocks: no few runs to name
    range(p_.k, p_.kv_dtype, pos.hk, 1, pos.lk, p_.d, 1);
    range(p_.v, p_.kv_dtype, pos.hk, 1, pos.lk, p_.dv, 2);
  }
  range(p_.out, p_.out_dtype, pos.hk * group_, group_, pos.lq, p_.dv, 3);
  if (bytes > kPrefetchHeadBytes || bytes <= kPrefetchHeadMinBytes) return {};
  return in;
}

bool WorkPlan::heads_side_by_side() const {
  if (p_.paged.on) return true;
  const size_t nb = p_.batch_shape.size();
  const int64_t head = p_.k.strides[nb], row = p_.k.strides[nb + 1];
  return std::abs(head) < std::abs(row);
}

// Few items (decode: B x Hkv of them) would leave cores idle: each item's keys are cut into
// chunks. Many (batch, kv head) pairs per thread: a task runs all query tiles of one pair, so
// its K^T tiles are packed once, not once per thread that gets one of its tiles. Decode over
// heads side by side: a task runs the most kv heads of a batch entry in lockstep that still
// leaves kLockstepTasksPerThread tasks per thread. The results are the same bits whatever the
// grouping (every item is computed alike), so it may use the thread count; the chunking
// depends on the shape, the options (causal, window, diagonal, global tokens) and kv_lengths
// alone.
TaskPlan plan_tasks(const WorkPlan& plan, int64_t wanted_threads) {
  TaskPlan t;
  const int64_t items = plan.items(), keys = plan.split_keys();
  if (!plan.varlen()) t.chunks = key_chunks(items, keys);
  t.chunk_keys = ((keys + t.chunks - 1) / t.chunks + kTileKeys - 1) / kTileKeys * kTileKeys;
  if (t.chunks > 1) t.chunks = (keys + t.chunk_keys - 1) / t.chunk_keys;
  const int64_t tiles_per_head = plan.query_tiles_per_head();  // 0: varlen, they differ
  if (t.chunks == 1 && tiles_per_head > 0 &&
      items / tiles_per_head >= kWholeHeadTasksPerThread * wanted_threads) {
    t.items_per_task = tiles_per_head;
    t.whole_heads = true;
  }
  const int64_t tasks = t.chunks > 1 ? items * t.chunks : items / t.items_per_task;
  // One query tile per head (so items_per_task is 1): item b * Hkv + hk is kv head hk of
  // batch entry b, and a group of heads is a run of items.
  if (plan.rows_in_place() && plan.heads_side_by_side()) {
    const int64_t hkv = items / plan.batch();
    for (int64_t g = hkv; g > 1; --g) {
      if (hkv % g == 0 && tasks / g >= kLockstepTasksPerThread * wanted_threads) {
        t.heads_per_task = g;
        break;
      }
    }
  }
  t.tasks = tasks / t.heads_per_task;
  if (t.heads_per_task > 1) t.whole_heads = false;
  return t;
}

}  // namespace cpuattn
