// The backward (backward_step.inl) with its five products on the AMX tile unit, in three
// parts the driver sequences (Bf16BackwardKernels), from bfloat16 operands it prepared
// (Bf16BackwardOperands). Per pair, the weights (bf16_backward_weights.inl): S = q K^T and
// dP = dO V^T as the forward's scores (rows_times_keys), the float32 step's softmax and
// gradient, then P and dS rounded to bfloat16 as pairs of query rows and dS as rows. Per query
// tile, accumulate_dq: dQ += dS K over the sweep's key tiles (K as pairs of keys). Per key tile,
// accumulate_key_gradient: dV^T += dO^T P and dK^T += q^T dS over a block of query tiles. Summing
// over several tiles with the accumulator in tile registers keeps the tile unit multiplying rather
// than loading and storing accumulators (a pair alone gives each accumulator tile two products:
// that was half the step's time at D = 128). P and dS are rounded to bfloat16, as the forward
// rounds P for a bfloat16 output (and as torch's bfloat16 backward does): hi + lo halves for
// float32 accuracy cost 1.3x the time at D = 128 (measured), for gradients returned in bfloat16.
// Include after amx_step.inl and bf16_backward_weights.inl.

// c[r0 .. r0 + 16, 0 .. 64) = a . b^T for blocks of 16 rows r0 < rows: a rows of k bfloat16,
// b k / 2 x kTileKeys pairs (k a multiple of 32). Bare products (the tile unit cannot scale).
inline void rows_times_keys(const uint16_t* a, int64_t k, const uint32_t* b, float* c,
                            int64_t rows) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const int64_t a_stride = k * 2, b_stride = W * 4, c_stride = W * 4;
  memory_barrier();  // the operands were written by plain stores
  for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t e = 0; e < k; e += 2 * cpuattn::kAmxPairs) {
      _tile_loadd(4, a + r0 * k + e, a_stride);
      const uint32_t* kb = b + e / 2 * W;
      _tile_loadd(5, kb, b_stride);
      _tile_loadd(7, kb + 16, b_stride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, kb + 32, b_stride);
      _tile_loadd(7, kb + 48, b_stride);
      _tile_dpbf16ps(2, 4, 5);
      _tile_dpbf16ps(3, 4, 7);
    }
    float* out = c + r0 * W;
    _tile_stored(0, out, c_stride);
    _tile_stored(1, out + 16, c_stride);
    _tile_stored(2, out + 32, c_stride);
    _tile_stored(3, out + 48, c_stride);
  }
  memory_barrier();  // c, read next by plain loads
}

// Tile register t += A (tile 4) times the B pairs at `b` (into tile 5).
#define CPUATTN_AMX_ACC(t, b, stride) \
  do {                                \
    _tile_loadd(5, (b), (stride));    \
    _tile_dpbf16ps(t, 4, 5);          \
  } while (0)

// c[m x kTileKeys] += sum over n query tiles of a[i] . pairs[i]: a[i] m rows (a multiple of 16)
// of kTileRows bfloat16 (q^T or dO^T), pairs[i] query row pairs (dS or P), over their first
// chunks[i] 32-row chunks. The accumulator tiles stay in registers over all n tiles.
void accumulate_key_gradient(float* c, int64_t m, int n, const uint16_t* const* a,
                             const uint32_t* const* pairs, const int64_t* chunks) {
  constexpr int64_t W = cpuattn::kTileKeys, R = cpuattn::kTileRows;
  const int64_t a_stride = R * 2, b_stride = W * 4, c_stride = W * 4;
  memory_barrier();  // c and the operands were written by plain stores
  for (int64_t i = 0; i < m; i += kAmxRows) {
    float* out = c + i * W;
    _tile_loadd(0, out, c_stride);
    _tile_loadd(1, out + 16, c_stride);
    _tile_loadd(2, out + 32, c_stride);
    _tile_loadd(3, out + 48, c_stride);
    for (int t = 0; t < n; ++t) {
      for (int64_t ch = 0; ch < chunks[t]; ++ch) {
        _tile_loadd(4, a[t] + i * R + ch * 32, a_stride);
        const uint32_t* row_pairs = pairs[t] + ch * kAmxRows * W;
        CPUATTN_AMX_ACC(0, row_pairs, b_stride);
        CPUATTN_AMX_ACC(1, row_pairs + 16, b_stride);
        CPUATTN_AMX_ACC(2, row_pairs + 32, b_stride);
        CPUATTN_AMX_ACC(3, row_pairs + 48, b_stride);
      }
    }
    _tile_stored(0, out, c_stride);
    _tile_stored(1, out + 16, c_stride);
    _tile_stored(2, out + 32, c_stride);
    _tile_stored(3, out + 48, c_stride);
  }
  memory_barrier();  // c, read next by plain loads
}
#undef CPUATTN_AMX_ACC

// Tile register t += dS rows (tile 4) times the K pairs at `kp` (into tile 5).
#define CPUATTN_AMX_DQ(t)                                \
  do {                                                   \
    _tile_loadd(5, kp + (t) * kAmxOutColumns, k_stride); \
    _tile_dpbf16ps(t, 4, 5);                             \
  } while (0)

// c[16 rows x 16 * NT columns] (c_stride bytes between rows) += sum over n key tiles of dS
// rows (ds[i] + r0 rows) . K pairs (k[i] + e0 columns), over their first chunks[i] chunks.
template <int NT>
inline void dq_block(float* c, int64_t c_stride, int64_t r0, int64_t e0, int64_t d, int n,
                     const uint16_t* const* ds, const uint32_t* const* k, const int64_t* chunks) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const int64_t ds_stride = W * 2, k_stride = d * 4;
  _tile_loadd(0, c, c_stride);
  if constexpr (NT > 1) _tile_loadd(1, c + 16, c_stride);
  if constexpr (NT > 2) _tile_loadd(2, c + 32, c_stride);
  if constexpr (NT > 3) _tile_loadd(3, c + 48, c_stride);
  for (int t = 0; t < n; ++t) {
    for (int64_t ch = 0; ch < chunks[t]; ++ch) {
      _tile_loadd(4, ds[t] + r0 * W + ch * 32, ds_stride);
      const uint32_t* kp = k[t] + ch * kAmxRows * d + e0;
      CPUATTN_AMX_DQ(0);
      if constexpr (NT > 1) CPUATTN_AMX_DQ(1);
      if constexpr (NT > 2) CPUATTN_AMX_DQ(2);
      if constexpr (NT > 3) CPUATTN_AMX_DQ(3);
    }
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NT > 1) _tile_stored(1, c + 16, c_stride);
  if constexpr (NT > 2) _tile_stored(2, c + 32, c_stride);
  if constexpr (NT > 3) _tile_stored(3, c + 48, c_stride);
}
#undef CPUATTN_AMX_DQ

// dq[rows x d] (d apart) += sum over n key tiles of ds[i] . K_i, 16 rows and 64 columns at a
// time (d a multiple of 32). A block of fewer than 16 rows goes through a local copy: the
// tile unit writes all 16.
void accumulate_dq(float* dq, int64_t rows, int64_t d, int n, const uint16_t* const* ds,
                   const uint32_t* const* k, const int64_t* chunks) {
  alignas(64) float part[kAmxRows][64];
  memory_barrier();  // dq and the operands were written by plain stores
  for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
    const int64_t m = rows - r0 < kAmxRows ? rows - r0 : kAmxRows;
    for (int64_t e0 = 0; e0 < d; e0 += 64) {
      const int nt = d - e0 >= 64 ? 4 : 2;
      float* c = dq + r0 * d + e0;
      int64_t c_stride = d * 4;
      if (m < kAmxRows) {
        for (int64_t r = 0; r < kAmxRows; ++r) {
          for (int64_t e = 0; e < 16 * nt; ++e) part[r][e] = r < m ? c[r * d + e] : 0.0f;
        }
        memory_barrier();
        c = part[0];
        c_stride = 64 * 4;
      }
      if (nt == 4) {
        dq_block<4>(c, c_stride, r0, e0, d, n, ds, k, chunks);
      } else {
        dq_block<2>(c, c_stride, r0, e0, d, n, ds, k, chunks);
      }
      if (m < kAmxRows) {
        memory_barrier();
        float* to = dq + r0 * d + e0;
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t e = 0; e < 16 * nt; ++e) to[r * d + e] = part[r][e];
        }
      }
    }
  }
  memory_barrier();  // dq, read next by plain loads
}
