// The driver: runs the work plan (plan.h) on OpenMP threads and feeds each work item one key
// tile at a time to the active micro-kernel: the query tile staged (query_stage.h), K and V
// from the call's K/V source (kv_source.h), finished rows written or merged (output.h).
// Each work item is computed the same way whichever thread runs it, so results are bitwise
// identical for any thread count.
#include "attention.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <variant>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "aligned_buffer.h"
#include "kernels/kernel.h"
#include "kv_source.h"
#include "mask.h"
#include "mask_columns.h"
#include "output.h"
#include "plan.h"
#include "query_stage.h"
#include "threads.h"
#include "tiles.h"

namespace cpuattn {
namespace {

// The step a call runs and how K and V reach it.
template <typename T>
struct StepChoice {
  void (*step)(const TileStep<T>&) = nullptr;
  KvPath path = KvPath::ComputeType;
  int64_t d_pairs = 0;  // D's bfloat16 pairs, padded as the step needs (KvPath::Bf16Pairs)
  bool on_amx = false;  // `step` is the AMX step: each thread brackets its steps with these
  void (*amx_begin)() = nullptr;
  void (*amx_end)() = nullptr;

  // q's bfloat16 pairs per row, or -1: q is staged in the compute type.
  int64_t q_pairs() const { return path == KvPath::Bf16Pairs ? d_pairs : -1; }
};

// bfloat16 K and V go to the bfloat16 steps, AMX tiles first (they need Dv % 16 == 0), where
// the ISA has them; other half K and V are converted to float32 for the float step. Decode
// (K and V rows read in place) widens bfloat16 rows as it loads them (a 16-bit shift) for the
// float step, as float16: only a bfloat16 q takes the vdpbf16ps scores of the AVX512-BF16
// step. AMX tiles of 16 rows would be mostly empty, and the AMX kernel set has no vdpbf16ps
// step (slower than FMAs there); a float32 q would need two dot products per pair (q split
// into two bfloat16), where the widened rows give exact products with one FMA. Measured on a
// Xeon with AMX, decode (1, 32, 1, 128) over (1, 8, 16384, 128): AMX tiles 0.94x the float32
// cache's time, widened rows 1.5-1.8x.
template <typename T>
StepChoice<T> choose_step(const Params& p, const KernelSet& kernels, const WorkPlan& plan) {
  StepChoice<T> c;
  c.path = p.kv_dtype == p.compute_dtype ? KvPath::ComputeType : KvPath::WidenedToFloat;
  c.d_pairs = (p.d + 1) / 2;
  if constexpr (std::is_same_v<T, double>) {
    c.step = kernels.step_f64;
  } else {
    c.step = kernels.step_f32;
    if (p.kv_dtype != DType::BF16 || p.additive_w) return c;
    if (plan.rows_in_place()) {
      if (kernels.step_bf16 && p.q_dtype == DType::BF16) {
        c.step = kernels.step_bf16;
        c.path = KvPath::Bf16Pairs;
      }
      return c;
    }
    if (kernels.step_bf16_amx && p.dv % 16 == 0) {
      c.step = kernels.step_bf16_amx;
      c.path = KvPath::Bf16Pairs;
      c.d_pairs = (c.d_pairs + kAmxPairs - 1) / kAmxPairs * kAmxPairs;
      c.on_amx = true;
      c.amx_begin = kernels.amx_begin;
      c.amx_end = kernels.amx_end;
    } else if (kernels.step_bf16) {
      c.step = kernels.step_bf16;
      c.path = KvPath::Bf16Pairs;
    }
  }
  return c;
}

// Per-thread buffers, sized once per call before the parallel region: O(tile) plus the capped
// tile caches, never O(Lq x Lk). Uninitialized (AlignedBuffer): each is written before it is
// read, by the thread that owns it. Each buffer starts on a cache line, and so does the struct
// (its own fields, q_first and the caches' owners, change per item): no line is written by
// two threads.
template <typename T>
struct alignas(64) Scratch {
  QueryRows<T> rows;
  KvScratch<T> kv;
  AlignedBuffer<T> merged;  // merge's sums for one row (Dv)
  // Tasks of several kv heads in lockstep (TaskPlan::heads_per_task): each item's rows, step
  // and position, on cache lines of their own (written every tile).
  struct alignas(64) Head {
    QueryRows<T> rows;
    TileStep<T> step{};
    ItemPos pos{};
  };
  std::vector<Head> heads;

  // q_pairs: q's bfloat16 pairs per row, or -1. cache: worth it only when several query
  // tiles read the same keys; with one (decode) the cache would only add first-touch page
  // faults. tile_rows: the most rows a tile of the call has (the rows' buffers hold as many,
  // not kTileRows: a decode tile has a few).
  Scratch(const Params& p, const KvSource<T>& source, int64_t q_pairs, int64_t max_keys, bool cache,
          int64_t heads_per_task, int64_t tile_rows)
      : rows(p.d, p.dv, q_pairs, QueryRows<T>::room(tile_rows)), merged(p.dv) {
    const int64_t tiles = (max_keys + kTileKeys - 1) / kTileKeys;
    std::visit([&](const auto& s) { s.reserve(kv, tiles, cache); }, source);
    if (heads_per_task > 1) {
      heads.reserve(size_t(heads_per_task));
      for (int64_t h = 0; h < heads_per_task; ++h) {
        heads.push_back({QueryRows<T>(p.d, p.dv, q_pairs, QueryRows<T>::room(tile_rows))});
      }
    }
  }
};

template <typename T>
class Driver {
 public:
  Driver(const Params& p, const KernelSet& kernels, const WorkPlan& plan,
         const StepChoice<T>& choice)
      : p_(p), plan_(plan), step_(choice.step),
        source_(p.paged.on ? choose_kv_source<T>(p, kernels, plan, PagedLayout(p), choice.path,
                                                 choice.on_amx, choice.d_pairs)
                           : choose_kv_source<T>(p, kernels, plan, DenseLayout(p), choice.path,
                                                 choice.on_amx, choice.d_pairs)),
        query_(p, kernels, plan, choice.q_pairs(),
               std::visit([](const auto& s) { return s.staged_query(); }, source_)),
        output_(p, kernels, plan) {
    proto_ = call_step<T>(p);
    if (choice.path == KvPath::Bf16Pairs) {
      proto_.d_pairs = choice.d_pairs;
      proto_.split_p = p.out_dtype != DType::BF16;  // full float32 accuracy for a float32 out
    }
    std::visit([&](const auto& s) { s.setup(proto_); }, source_);
  }

  const KvSource<T>& source() const { return source_; }
  int64_t partial_elems() const { return output_.partial_elems(); }

  // Only keys in [chunk.begin, chunk.end) are visited; with `partial` set the unnormalized
  // state goes there for merge_item, else the finished rows go to out / lse. `next`: the
  // next task's ranges, of which this item, part `part` of `parts` of its task, prefetches
  // that share over its key tiles.
  void run_item(int64_t item, Scratch<T>& sc, KeyChunk chunk = {0, INT64_MAX}, T* partial = nullptr,
                const TaskRanges* next = nullptr, int64_t part = 0, int64_t parts = 1) const {
    std::visit([&](const auto& s) { run_item_on(s, item, sc, chunk, partial, next, part, parts); },
               source_);
  }

  // Items [first, first + heads): the kv heads of one batch entry, one query tile each (decode
  // over a cache that keeps a position's heads side by side), stepped in lockstep: every key
  // tile of every head before the next key tile. Each item is computed as run_item computes
  // it. With partials, item i's chunk c goes to partials + (i * chunks + c) * partial_elems().
  void run_heads(int64_t first, int64_t heads, Scratch<T>& sc, KeyChunk chunk, T* partials,
                 int64_t chunks, int64_t c) const {
    std::visit(
        [&](const auto& s) { run_heads_on(s, first, heads, sc, chunk, partials, chunks, c); },
        source_);
  }

  void merge_item(int64_t item, const T* partials, int64_t chunks, T* acc) const {
    output_.merge(plan_.locate(item), partials, chunks, acc);
  }

 private:
  template <typename Source>
  void run_heads_on(const Source& source, int64_t first, int64_t heads, Scratch<T>& sc,
                    KeyChunk chunk, T* partials, int64_t chunks, int64_t c) const {
    auto* state = sc.heads.data();
    for (int64_t h = 0; h < heads; ++h) state[h].pos = plan_.locate(first + h);
    // One batch entry, one query tile a head (TaskPlan::heads_per_task): the same rows, bounds
    // and key tiles for every head.
    const ItemPos& pos0 = state[0].pos;
    const RowBounds rb = plan_.row_bounds(pos0);
    for (int64_t h = 0; h < heads; ++h) {
      query_.stage(state[h].pos, rb, state[h].rows);
      state[h].step = proto_;
      query_.point(state[h].step, state[h].rows, state[h].pos.rows);
    }
    const int64_t i_first = state[0].rows.pos[0], i_last = state[0].rows.pos[pos0.rows - 1];
    const KeyTiles tiles(rb, i_first, i_last, chunk);
    const int64_t j_end = tiles.end();
    for (int64_t j0 = tiles.first(), following; j0 < j_end; j0 = following) {
      const int64_t j1 = tiles.tile_end(j0);
      following = tiles.next(j0);
      const TileKind kind = classify_tile(rb, i_first, i_last, j0, j1);
      if (kind == TileKind::Skip) continue;
      const int64_t staged = std::min(kTileKeys, rb.n_keys - j0);
      const uint64_t global_cols = kind == TileKind::Partial ? rb.global_cols(j0, j1) : 0;
      const int64_t next_keys = following == j1 ? std::min(kTileKeys, j_end - j1) : 0;
      for (int64_t h = 0; h < heads; ++h) {
        TileStep<T>& step = state[h].step;
        const ItemPos& pos = state[h].pos;
        step.cols = j1 - j0;
        step.j0 = j0;
        step.apply_bounds = kind == TileKind::Partial;
        step.global_cols = global_cols;
        // This thread reads the next head's same tile next; after the last head, the first
        // head's next tile.
        const bool last = h + 1 == heads;
        const typename Source::Tile::Next next{source.head(state[last ? 0 : h + 1].pos),
                                               last ? j1 : j0, last ? next_keys : staged};
        source.tile(step, source.head(pos), {j0, staged, pos.b * p_.hkv + pos.hk, next}, sc.kv);
        run_step(step);
      }
    }
    for (int64_t h = 0; h < heads; ++h) {
      if (partials) {
        output_.write_partial(state[h].pos, state[h].rows,
                              partials + ((first + h) * chunks + c) * output_.partial_elems());
      } else {
        output_.write_rows(state[h].pos, state[h].rows);
      }
    }
  }

  template <typename Source>
  void run_item_on(const Source& source, int64_t item, Scratch<T>& sc, KeyChunk chunk, T* partial,
                   const TaskRanges* next, int64_t part, int64_t parts) const {
    const ItemPos pos = plan_.locate(item);
    const RowBounds rb = plan_.row_bounds(pos);
    query_.stage(pos, rb, sc.rows);
    const int64_t i_first = sc.rows.pos[0], i_last = sc.rows.pos[pos.rows - 1];

    TileStep<T> step = proto_;
    query_.point(step, sc.rows, pos.rows);
    const auto head = source.head(pos);

    const int64_t owner = pos.b * p_.hkv + pos.hk;
    const KeyTiles tiles(rb, i_first, i_last, chunk);
    // Rows at global positions, widened to whole row blocks [g0, g1): all that a tile outside
    // the band with no global key needs (such tiles are there for them alone).
    int64_t g0 = pos.rows, g1 = 0;
    for (int64_t r = 0; rb.globals.n > 0 && r < pos.rows; ++r) {
      if (rb.global_rows_in(sc.rows.pos[r], sc.rows.pos[r])) {
        g0 = std::min(g0, r);
        g1 = r + 1;
      }
    }
    g0 = g0 / kStepRowBlock * kStepRowBlock;
    g1 = std::min(pos.rows, (g1 + kStepRowBlock - 1) / kStepRowBlock * kStepRowBlock);
    const bool narrowable = g0 < g1 && g1 - g0 < pos.rows;
    const int64_t j_first = tiles.first(), j_end = tiles.end();
    const int64_t key_tiles = (j_end - j_first + kTileKeys - 1) / kTileKeys;
    for (int64_t j0 = j_first, following; j0 < j_end; j0 = following) {
      const int64_t j1 = tiles.tile_end(j0);
      following = tiles.next(j0);
      const TileKind kind = classify_tile(rb, i_first, i_last, j0, j1);
      if (kind == TileKind::Skip) continue;
      const int64_t share = part * key_tiles + (j0 - j_first) / kTileKeys;
      const int64_t shares = parts * key_tiles;
      for (int i = 0; next && i < kPrefetchRanges; ++i) {  // share-th of shares, whole lines
        const int64_t lines = next->rows[i] * next->row_lines[i];
        const int64_t lo = share * lines / shares, hi = (share + 1) * lines / shares;
        step.prefetch[i] = {next->at[i], next->row_lines[i], next->stride[i], lo, hi - lo};
      }
      step.cols = j1 - j0;
      step.j0 = j0;
      step.apply_bounds = kind == TileKind::Partial;
      step.global_cols = kind == TileKind::Partial ? rb.global_cols(j0, j1) : 0;
      // Stage the whole valid tile (up to n_keys) so every query tile can reuse it; prefetch
      // the next one when it follows this one.
      const int64_t next_keys = following == j1 ? std::min(kTileKeys, j_end - j1) : 0;
      source.tile(step, head,
                  {j0, std::min(kTileKeys, rb.n_keys - j0), owner, {head, j1, next_keys}}, sc.kv);
      if (narrowable && rb.only_global_rows(i_first, i_last, j0, j1)) {
        TileStep<T> part = query_.rows_of(step, g0, g1);
        run_step(part);
      } else {
        run_step(step);
      }
    }
    if (partial) {
      output_.write_partial(pos, sc.rows, partial);
    } else {
      output_.write_rows(pos, sc.rows);
    }
  }

  // The step over the keys of its tile that its rows keep by the mask (mask_columns.h): no
  // step where they keep none.
  void run_step(TileStep<T>& step) const {
    step.cols = mask_kept_cols(step);
    if (step.cols > 0) step_(step);
  }

  const Params& p_;
  const WorkPlan& plan_;
  void (*step_)(const TileStep<T>&);
  KvSource<T> source_;
  QueryStage<T> query_;
  OutputWriter<T> output_;
  TileStep<T> proto_{};
};

template <typename T>
void run(const Params& p, const KernelSet& kernels) {
  if (p.hkv == 0 || p.hq == 0 || p.lq == 0) return;
  const WorkPlan plan(p, kernels.step_bf16 && !kernels.step_bf16_amx);
  const StepChoice<T> choice = choose_step<T>(p, kernels, plan);
  const int64_t items = plan.items();
  if (items == 0) return;
  const Driver<T> driver(p, kernels, plan, choice);

  const CallInFlight call;
  const int64_t wanted = threads_for_call(p.num_threads, call.count());
  const TaskPlan tp = plan_tasks(plan, wanted);
  const int64_t chunks = tp.chunks, items_per_task = tp.items_per_task, tasks = tp.tasks;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min(wanted, tasks)));

  // Allocate before the parallel region: an allocation failure must surface as an exception
  // here (MemoryError in Python), never inside OpenMP where it would terminate the process.
  // Nothing allocates or throws inside it.
  ThreadScratch<Scratch<T>> scratch(threads);
  const bool cache_keys = plan.query_tiles_per_head() != 1;
  for (int t = 0; t < threads; ++t) {
    scratch.add(p, driver.source(), choice.q_pairs(), plan.max_keys(), cache_keys,
                tp.heads_per_task, plan.max_tile_rows());
  }
  // Every task writes its whole partial result before the merge reads it: not initialized.
  // One per (item, chunk), whatever the tasks group.
  const AlignedBuffer<T> partials(chunks > 1 ? items * chunks * driver.partial_elems() : 0);

  // successor: the task this thread runs next, or -1: a whole-head task prefetches its data.
  const bool whole_heads = tp.whole_heads;
  auto run_task = [&](int64_t task, Scratch<T>& sc, int64_t successor = -1) {
    if (tp.heads_per_task > 1) {
      const int64_t c = task % chunks;
      driver.run_heads(tp.first_item(task), tp.heads_per_task, sc,
                       chunks > 1 ? tp.chunk(c) : KeyChunk{0, INT64_MAX},
                       chunks > 1 ? partials.data() : nullptr, chunks, c);
      return;
    }
    if (chunks == 1) {
      TaskRanges next;
      if (whole_heads && successor >= 0) next = plan.head_ranges(successor * items_per_task);
      for (int64_t part = 0; part < items_per_task; ++part) {
        driver.run_item(task * items_per_task + part, sc, {0, INT64_MAX}, nullptr, &next, part,
                        items_per_task);
      }
      return;
    }
    driver.run_item(task / chunks, sc, tp.chunk(task % chunks),
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
  void (*amx_begin)() = choice.amx_begin;
  void (*amx_end)() = choice.amx_end;

#ifdef _OPENMP
  // One thread runs without a parallel region: entering one costs as much as a small call's
  // work.
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      Scratch<T>& sc = scratch[omp_get_thread_num()];
      if (amx_begin) amx_begin();
      // Any schedule gives the same bits. Other than whole heads, dynamic: causal and
      // windowed items differ in cost.
      if (whole_heads) {
        run_whole_heads(sc);
      } else {
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) run_task(task, sc);
      }
      if (amx_end) amx_end();
      if (chunks > 1) {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) merge(item, sc);
      }
    }
    return;
  }
#endif
  if (amx_begin) amx_begin();
  if (whole_heads) {
    run_whole_heads(scratch[0]);
  } else {
    for (int64_t task = 0; task < tasks; ++task) run_task(task, scratch[0]);
  }
  if (amx_end) amx_end();
  for (int64_t item = 0; chunks > 1 && item < items; ++item) merge(item, scratch[0]);
}

}  // namespace

void attention(const Params& p) {
  const KernelSet& kernels = active_kernels();
  if (p.compute_dtype == DType::F32) {
    run<float>(p, kernels);
  } else {
    run<double>(p, kernels);
  }
}

}  // namespace cpuattn
