// The backward driver: FlashAttention-2's backward (Dao 2023, arXiv 2307.08691, Algorithm 2)
// over the forward's work plan. A task is one key chunk of one (batch, kv head) pair: for
// each key tile of the chunk, every query tile that keeps some of its keys is staged (as the
// forward stages it, query_stage.h) and the kernel's backward step recomputes the weights from
// the saved lse and adds that pair's share to the tile's dK and dV (whole in this task, so
// written once at the end of the tile) and to a dQ partial of the chunk. dQ is then the sum of
// the chunks' partials, in chunk order. No atomics, no sum whose order depends on the threads:
// the results are bitwise identical for any thread count, and a single long head still gives
// every core work (its keys are cut into chunks).
#include "backward.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "aligned_buffer.h"
#include "kernels/kernel.h"
#include "mask.h"
#include "plan.h"
#include "query_stage.h"
#include "threads.h"
#include "tiles.h"

namespace cpuattn {
namespace {

// Tasks a call is cut into at least (when the keys allow): pairs x chunks. From the shape only,
// never the thread count (the chunks decide the order of dQ's sums); 32 keep 16 cores busy
// with causal tasks of unequal cost.
constexpr int64_t kBackwardMinTasks = 32;
// Bytes of dQ partials (chunks x dQ in the compute type) past which the keys are cut into
// fewer chunks.
constexpr int64_t kMaxPartialBytes = int64_t(1) << 28;

struct ChunkPlan {
  int64_t pairs = 0, chunks = 1, chunk_keys = kTileKeys;
};

template <typename T>
ChunkPlan plan_chunks(const WorkPlan& plan, const Params& p) {
  ChunkPlan c;
  int64_t batch = 1;
  for (int64_t n : p.batch_shape) batch *= n;
  c.pairs = batch * p.hkv;
  const int64_t keys = plan.valid_keys();
  const int64_t key_tiles = (keys + kTileKeys - 1) / kTileKeys;
  int64_t chunks = 1;
  if (c.pairs < kBackwardMinTasks) {
    chunks = std::min(key_tiles, (kBackwardMinTasks + c.pairs - 1) / c.pairs);
  }
  const int64_t dq_elems = c.pairs * plan.rows_per_head_group() * p.d;
  if (dq_elems > 0) {
    chunks = std::min(chunks, kMaxPartialBytes / int64_t(sizeof(T)) / dq_elems);
  }
  chunks = std::max<int64_t>(chunks, 1);
  c.chunk_keys = std::max<int64_t>((key_tiles + chunks - 1) / chunks, 1) * kTileKeys;
  c.chunks = std::max<int64_t>((keys + c.chunk_keys - 1) / c.chunk_keys, 1);
  return c;
}

// Whether rows x width elements (ld apart) hold an inf or NaN: x - x is NaN exactly for those.
// Eight sums, so that the adds do not wait on each other.
template <typename T>
bool any_nonfinite(const T* x, int64_t ld, int64_t rows, int64_t width) {
  T acc[8] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * ld;
    int64_t e = 0;
    for (; e + 8 <= width; e += 8) {
      for (int i = 0; i < 8; ++i) acc[i] += row[e + i] - row[e + i];
    }
    for (; e < width; ++e) acc[0] += row[e] - row[e];
  }
  T all = 0;
  for (T a : acc) all += a;
  return all != all;
}

// Per-thread buffers, allocated before the parallel region; each written before it is read.
template <typename T>
struct alignas(64) BackwardScratch {
  QueryRows<T> rows;  // positions, bounds, mask rows, slopes, scores, q (unless read in place)
  AlignedBuffer<T> dout, lse, delta, dp, cap_grad;  // the query tile's
  AlignedBuffer<T> kt, vt, dk, dv;                             // the key tile's
  AlignedBuffer<int8_t> tile_nonfinite;  // per query tile of the task's head: -1 not yet known

  BackwardScratch(const Params& p, int64_t q_tiles)
      : rows(p.d, p.dv, -1), dout(kTileRows * p.dv), lse(kTileRows), delta(kTileRows),
        dp(kTileRows * kTileKeys), cap_grad(p.softcap > 0 ? kTileRows * kTileKeys : 0),
        kt(p.d * kTileKeys), vt(p.dv * kTileKeys), dk(kTileKeys * p.d), dv(kTileKeys * p.dv),
        tile_nonfinite(q_tiles) {}
};

template <typename T>
class BackwardDriver {
 public:
  BackwardDriver(const BackwardParams& bp, const KernelSet& kernels, const WorkPlan& plan,
                 const ChunkPlan& chunks)
      : bp_(bp), p_(bp.fwd), plan_(plan), chunks_(chunks), group_(plan.group()),
        rows_per_pair_(plan.rows_per_head_group()), q_tiles_(plan.query_tiles_per_head()),
        query_(bp.fwd, kernels, plan, -1, false) {
    if constexpr (std::is_same_v<T, float>) {
      step_ = kernels.backward_f32;
      pack_ = kernels.pack_f32;
    } else {
      step_ = kernels.backward_f64;
      pack_ = kernels.pack_f64;
    }
    const size_t nb = p_.batch_shape.size();
    proto_.d = p_.d;
    proto_.dv = p_.dv;
    proto_.dot_scale = static_cast<T>(p_.scale);
    proto_.mask_kind = p_.mask_kind;
    proto_.mask_col_stride = p_.mask.data ? p_.mask.strides[nb + 2] : 0;
    proto_.softcap = static_cast<T>(p_.softcap);
    proto_.key.form = KeyForm::PackedT;
    proto_.key.elem = Elem::Compute;
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
  int64_t tasks() const { return chunks_.pairs * chunks_.chunks; }
  int64_t partial_elems() const { return rows_per_pair_ * p_.d; }  // one pair's dQ

  // Task `task`: chunk task / pairs of pair task % pairs (chunk 0, the costliest under causal
  // masks, of every pair first). Its dQ partial is partials[task].
  void run_task(int64_t task, BackwardScratch<T>& sc, T* partials) const {
    const int64_t pair = task % chunks_.pairs, chunk = task / chunks_.pairs;
    T* dq = partials + task * partial_elems();
    std::fill(dq, dq + partial_elems(), T(0));
    std::fill(sc.tile_nonfinite.data(), sc.tile_nonfinite.data() + q_tiles_, int8_t(-1));
    const ItemPos head = plan_.locate(pair * q_tiles_);
    const RowBounds rb = plan_.row_bounds(head);
    const int64_t k_begin = chunk * chunks_.chunk_keys;
    const int64_t k_end = std::min(k_begin + chunks_.chunk_keys, rb.n_keys);
    for (int64_t j0 = k_begin; j0 < k_end; j0 += kTileKeys) {
      const int64_t j1 = std::min(j0 + kTileKeys, k_end);
      if (classify_tile(rb, 0, head.lq - 1, j0, j1) == TileKind::Skip) continue;
      run_key_tile(head, rb, pair, j0, j1, sc, dq);
    }
  }

  // dQ = scale x the sum of the chunks' partials, in chunk order, for the rows of query tile
  // `tile` (pair x q_tiles + tile in the head).
  void finish_dq(int64_t tile, const T* partials) const {
    const int64_t pair = tile / q_tiles_, r0 = (tile % q_tiles_) * kTileRows;
    const int64_t rows = std::min(kTileRows, rows_per_pair_ - r0);
    const ItemPos head = plan_.locate(pair * q_tiles_);
    const size_t nb = p_.batch_shape.size();
    T* dq = static_cast<T*>(const_cast<void*>(bp_.dq.data)) +
            batch_offset(p_.batch_shape, bp_.dq, head.b);
    const T scale = static_cast<T>(p_.scale);
    const int64_t d = p_.d, stride = chunks_.pairs * partial_elems();
    for (int64_t r = r0; r < r0 + rows; ++r) {
      const int64_t i = r / group_, h = head.hk * group_ + r % group_;
      T* out = dq + h * bp_.dq.strides[nb] + i * bp_.dq.strides[nb + 1];
      const T* first = partials + pair * partial_elems() + r * d;
      for (int64_t e = 0; e < d; ++e) {
        T sum = first[e];
        for (int64_t c = 1; c < chunks_.chunks; ++c) sum += first[c * stride + e];
        out[e] = sum * scale;
      }
    }
  }

 private:
  // Keys [j0, j1) of the pair against every query tile that keeps some of them; their dK and
  // dV, complete afterwards, are written to dk and dv.
  void run_key_tile(const ItemPos& head, const RowBounds& rb, int64_t pair, int64_t j0, int64_t j1,
                    BackwardScratch<T>& sc, T* dq) const {
    const size_t nb = p_.batch_shape.size();
    const int64_t cols = j1 - j0;
    const int64_t k_ld = p_.k.strides[nb + 1], v_ld = p_.v.strides[nb + 1];
    const T* k = static_cast<const T*>(p_.k.data) + batch_offset(p_.batch_shape, p_.k, head.b) +
                 head.hk * p_.k.strides[nb] + j0 * k_ld;
    const T* v = static_cast<const T*>(p_.v.data) + batch_offset(p_.batch_shape, p_.v, head.b) +
                 head.hk * p_.v.strides[nb] + j0 * v_ld;
    pack_(k, k_ld, cols, p_.d, sc.kt.data());
    pack_(v, v_ld, cols, p_.dv, sc.vt.data());
    std::fill(sc.dk.data(), sc.dk.data() + cols * p_.d, T(0));
    std::fill(sc.dv.data(), sc.dv.data() + cols * p_.dv, T(0));
    const bool keys_nonfinite = any_nonfinite(k, k_ld, cols, p_.d);
    bool q_in_place = false;  // the same for every tile of the call

    for (int64_t t = 0; t < q_tiles_; ++t) {
      const int64_t r0 = t * kTileRows;
      const int64_t rows = std::min(kTileRows, rows_per_pair_ - r0);
      const TileKind kind = classify_tile(rb, r0 / group_, (r0 + rows - 1) / group_, j0, j1);
      if (kind == TileKind::Skip) continue;
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
      q_in_place = b.scores.q_in_place;
      b.scores.key.data = sc.kt.data();
      b.scores.cols = cols;
      b.scores.j0 = j0;
      b.scores.apply_bounds = kind == TileKind::Partial;
      b.vt = sc.vt.data();
      b.k = k;
      b.k_ld = k_ld;
      b.lse = sc.lse.data();
      b.delta = sc.delta.data();
      b.dp = sc.dp.data();
      b.cap_grad = sc.cap_grad.data();
      b.dq = dq + r0 * p_.d;
      b.dk = sc.dk.data();
      b.dv = sc.dv.data();
      b.rows_nonfinite = sc.tile_nonfinite[t] != 0;
      b.keys_nonfinite = keys_nonfinite;
      step_(b);
    }
    // dK = dS^T (scale q): the scale is in a staged q, and applied here to one read in place.
    write_key_rows(bp_.dk, head, j0, cols, p_.d, sc.dk.data(),
                   q_in_place ? static_cast<T>(p_.scale) : T(1));
    write_key_rows(bp_.dv, head, j0, cols, p_.dv, sc.dv.data(), T(1));
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

  // Rows [j0, j0 + cols) of a (*batch, Hkv, Lk, width) gradient, from the tile's accumulators.
  void write_key_rows(const View& to, const ItemPos& head, int64_t j0, int64_t cols, int64_t width,
                      const T* acc, T scale) const {
    const size_t nb = p_.batch_shape.size();
    T* base = static_cast<T*>(const_cast<void*>(to.data)) +
              batch_offset(p_.batch_shape, to, head.b) + head.hk * to.strides[nb];
    for (int64_t j = 0; j < cols; ++j) {
      T* row = base + (j0 + j) * to.strides[nb + 1];
      for (int64_t e = 0; e < width; ++e) row[e] = acc[j * width + e] * scale;
    }
  }

  const BackwardParams& bp_;
  const Params& p_;
  const WorkPlan& plan_;
  ChunkPlan chunks_;
  int64_t group_, rows_per_pair_, q_tiles_;
  int64_t dout_ld_ = 0;  // elements between a tile's dout rows read in place; 0: copied
  QueryStage<T> query_;
  void (*step_)(const BackwardStep<T>&) = nullptr;
  void (*pack_)(const T*, int64_t, int64_t, int64_t, T*) = nullptr;
  TileStep<T> proto_{};
};

template <typename T>
void run_backward(const BackwardParams& bp, const KernelSet& kernels) {
  const Params& p = bp.fwd;
  if (p.hkv == 0 || p.hq == 0 || p.lq == 0) return;
  const WorkPlan plan(p);
  if (plan.items() == 0) return;
  const ChunkPlan chunks = plan_chunks<T>(plan, p);
  const BackwardDriver<T> driver(bp, kernels, plan, chunks);
  const int64_t tasks = driver.tasks(), q_tiles = chunks.pairs * driver.q_tiles();

  const CallInFlight call;
  const int64_t wanted = threads_for_call(p.num_threads, call.count());
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min(wanted, tasks)));
  // Allocated before the parallel region, where nothing allocates or throws (attention.cpp).
  std::vector<BackwardScratch<T>> scratch;
  scratch.reserve(threads);
  for (int t = 0; t < threads; ++t) scratch.emplace_back(p, driver.q_tiles());
  const AlignedBuffer<T> partials(tasks * driver.partial_elems());  // each zeroed by its task

#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    BackwardScratch<T>& sc = scratch[omp_get_thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) driver.run_task(task, sc, partials.data());
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < q_tiles; ++tile) driver.finish_dq(tile, partials.data());
  }
#else
  for (int64_t task = 0; task < tasks; ++task) driver.run_task(task, scratch[0], partials.data());
  for (int64_t tile = 0; tile < q_tiles; ++tile) driver.finish_dq(tile, partials.data());
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
