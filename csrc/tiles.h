// Tile sizes, in one place. Chosen for L1/L2 of current x86 cores (32-48 KiB L1d, >= 1 MiB L2):
// a 64-key tile of packed K (D x 64) plus a 64 x 64 score tile stay in L1/L2 for D <= 128.
#pragma once
#include <cstdint>

namespace cpuattn {

// Query rows per tile. Rows are (query position, head-in-GQA-group) pairs, so one K/V tile
// serves every query head that shares it.
constexpr int64_t kTileRows = 64;
// Keys per tile.
constexpr int64_t kTileKeys = 64;
// The most lanes of a vector: 16 float32 in a 512-bit register.
constexpr int64_t kMaxLanes = 16;
// The keys of a tile of `keys` that the forward step reads: rounded up to whole vectors of
// every ISA (score_width), so a packed K^T tile is written (zero past keys) that far.
constexpr int64_t padded_keys(int64_t keys) {
  return (keys + kMaxLanes - 1) / kMaxLanes * kMaxLanes < kTileKeys
             ? (keys + kMaxLanes - 1) / kMaxLanes * kMaxLanes
             : kTileKeys;
}
// Per-row partial sums of the softmax denominator: one per SIMD lane (16 float32 lanes in a
// 512-bit register at most), added up once per row when the output is written.
constexpr int64_t kSumSlots = 16;
// Each thread keeps the packed K^T tiles of the (batch, kv head) it works on, so query tiles
// after the first reuse them instead of re-packing (a transposing copy). Cap per thread, in
// elements: 2^21 = 8 MiB of float32 covers Lk = 32768 at D = 64; longer caches fall back to
// packing each tile per query tile.
constexpr int64_t kMaxPackedKeyElems = int64_t(1) << 21;

// Query tiles of at most this many rows, with no other query tile of the same head (decode),
// take their scores from K rows in place instead of packing K^T for them (measured at
// D = 128, Lk = 16384, GQA 4: faster up to 32 rows, even at 64).
constexpr int64_t kInPlaceMaxRows = 32;
// For float32 K, only while rows x kInPlaceDimsPerRow <= D: the in-place dot
// products fold each score's D / lanes products across lanes, a cost per (row, key) that
// packing K^T (a cost per (key, dim)) avoids. Measured on Zen 4 (AVX-512 and AVX2, float32,
// paired A/B, short sequences and decode over L2/L3-resident caches): packing was 1.1-1.2x
// faster at 12-32 rows for D = 32, 16-20 for D = 64 and 32 for D = 128, and 0.8-0.96x at 8-24
// rows for D = 128 and 12 for D = 64. So for bfloat16 q and K on CPUs with vdpbf16ps and no
// AMX (Zen 4): packed pairs 1.22-1.43x at (32, 12, 16-32, 32) and decode with 16-32 rows at
// D = 32-64 (AMX tiles for such heads not measured). float64 keeps kInPlaceMaxRows (8 lanes fold
// cheaper, and packing was 0.80x for decode with 16 rows at D = 64, 0.91x for (8, 12, 16, 64));
// so do other half and int8 caches (converting a streamed cache cost decode 0.91-0.97x).
constexpr int64_t kInPlaceDimsPerRow = 5;

// A step may read and write a tile's rows up to the next multiple of this (AMX works on 16
// query rows at a time): buffers for fewer than kTileRows rows round up to it.
constexpr int64_t kStepRowBlock = 16;

// AMX tile rows hold 16 bfloat16 pairs: with AMX kernels, q and K are padded to whole
// multiples of this many pairs along D.
constexpr int64_t kAmxPairs = 16;

// At least this many (batch, kv head) pairs per thread: each task takes a whole pair (all its
// query tiles) instead of one query tile.
constexpr int64_t kWholeHeadTasksPerThread = 8;
// Decode over kv heads side by side (TaskPlan::heads_per_task): groups of heads no larger than
// leave this many tasks per thread, so that uneven sequences still spread over the threads.
constexpr int64_t kLockstepTasksPerThread = 4;
// A whole-head task prefetches its successor's q, K, V and out (TaskRuns in threads.h) when
// they are at most this many bytes: half a 1 MiB L2, the current head and the next in it
// together. (256 KiB before: heads of 384 and 512 KiB, e.g. (8, 12, 384, 64) and
// (4, 8, 512, 64), took 0.94-0.97x the time at 512; at 768 the 512 KiB heads gained less.)
constexpr int64_t kPrefetchHeadBytes = int64_t(512) << 10;
// ... and when they are more than this many: a smaller head's prefetches cost more than the
// stalls they save (Zen 4, paired: (32, 12, 32, 32) and (32, 12, 24, 32), 16 and 12 KiB a head,
// 1.04-1.06x faster without; (32, 12, 40, 32), 20 KiB, 0.93x without; (8, 12, 32, 64), 32 KiB,
// 0.97x without).
constexpr int64_t kPrefetchHeadMinBytes = int64_t(16) << 10;
constexpr int kPrefetchRanges = 4;  // q, K, V, out

// Split-KV (decode): a call with fewer than kSplitBelowItems work items (batch x kv heads x
// query tiles) cuts each item's keys into chunks of at least kSplitMinChunkKeys, at most
// kSplitMaxItems (item, chunk) tasks in all, merged in chunk order afterwards.
constexpr int64_t kSplitBelowItems = 64;
constexpr int64_t kSplitMinChunkKeys = 512;
constexpr int64_t kSplitMaxItems = 256;

}  // namespace cpuattn
