// The backward pair (backward_step.inl) with its five products on the AMX tile unit, from
// bfloat16 operands the driver prepared (Bf16BackwardOperands): S = q K^T and dP = dO V^T as
// the forward's scores; dV^T += dO^T P and dK^T += q^T dS with P and dS as pairs of query rows;
// dQ += dS K with K as pairs of keys. The transposed accumulators put the operand that changes
// with every pair (P, dS) where the tile unit wants pairs, a cheap interleave, and leave the
// transposes to q and dO, prepared once per query tile for all its key tiles. The softmax and
// its gradient between the products are the float32 step's. P and dS are rounded to bfloat16
// for the three products that take them, as the forward rounds P for a bfloat16 output (and as
// torch's bfloat16 backward does): hi + lo halves for float32 accuracy cost 1.3x the time at
// D = 128 (measured), for gradients that are returned in bfloat16. Include after amx_step.inl.

// Pairs of query rows: P[2i][j] in the low half and P[2i + 1][j] in the high half of pair
// (i, j), i < kTileRows / 2 (the tile unit's B operand, rows as its inner dimension).
using RowPairs = uint32_t[cpuattn::kTileRows / 2][cpuattn::kTileKeys];
// Rows of bfloat16 (the A operand): dS for dQ.
using Bf16Rows = uint16_t[cpuattn::kTileRows][cpuattn::kTileKeys];

// c[r0 .. r0 + 16, 0 .. 64) = a . b^T for blocks of 16 rows r0 < rows: a rows of k bfloat16,
// b k / 2 x kTileKeys pairs (k a multiple of 32). Bare products (the tile unit cannot scale).
inline void rows_times_keys(const uint16_t* a, int64_t k, const uint32_t* b, float* c,
                            int64_t rows) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const int64_t a_stride = k * 2, b_stride = W * 4, c_stride = W * 4;
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
}

// Tile register t += A (tile 4) times the B pairs at `b` (into tile 5).
#define CPUATTN_AMX_ACC(t, b, stride) \
  do {                                \
    _tile_loadd(5, (b), (stride));    \
    _tile_dpbf16ps(t, 4, 5);          \
  } while (0)

// c[m x kTileKeys] += a . b, a: m rows (a multiple of 16) of kTileRows bfloat16 (q^T or
// dO^T), b: query row pairs (P or dS), c float32 in memory. Only the first `chunks` 32-row
// chunks of the query rows (the rest are zero in b).
inline void accumulate_transposed(const uint16_t* a, int64_t m, const RowPairs& b, float* c,
                                  int64_t chunks) {
  constexpr int64_t W = cpuattn::kTileKeys, R = cpuattn::kTileRows;
  const int64_t a_stride = R * 2, b_stride = W * 4, c_stride = W * 4;
  for (int64_t i = 0; i < m; i += kAmxRows) {
    float* out = c + i * W;
    _tile_loadd(0, out, c_stride);
    _tile_loadd(1, out + 16, c_stride);
    _tile_loadd(2, out + 32, c_stride);
    _tile_loadd(3, out + 48, c_stride);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      _tile_loadd(4, a + i * R + ch * 32, a_stride);
      const uint32_t* pairs = b[ch * kAmxRows];
      CPUATTN_AMX_ACC(0, pairs, b_stride);
      CPUATTN_AMX_ACC(1, pairs + 16, b_stride);
      CPUATTN_AMX_ACC(2, pairs + 32, b_stride);
      CPUATTN_AMX_ACC(3, pairs + 48, b_stride);
    }
    _tile_stored(0, out, c_stride);
    _tile_stored(1, out + 16, c_stride);
    _tile_stored(2, out + 32, c_stride);
    _tile_stored(3, out + 48, c_stride);
  }
}
#undef CPUATTN_AMX_ACC

// Tile register t += dS rows (tile 4) times the K pairs at `kp` (into tile 5).
#define CPUATTN_AMX_DQ(t)                                \
  do {                                                   \
    _tile_loadd(5, kp + (t) * kAmxOutColumns, k_stride); \
    _tile_dpbf16ps(t, 4, 5);                             \
  } while (0)

// dq[16 rows x 16 * NT columns] (c, c_stride bytes between rows) += dS rows . K pairs, over
// the first `chunks` 32-key chunks.
template <int NT>
inline void dq_block(float* c, int64_t c_stride, const uint16_t* ds, const uint32_t* k, int64_t d,
                     int64_t chunks) {
  const int64_t ds_stride = cpuattn::kTileKeys * 2, k_stride = d * 4;
  _tile_loadd(0, c, c_stride);
  if constexpr (NT > 1) _tile_loadd(1, c + 16, c_stride);
  if constexpr (NT > 2) _tile_loadd(2, c + 32, c_stride);
  if constexpr (NT > 3) _tile_loadd(3, c + 48, c_stride);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    _tile_loadd(4, ds + ch * 32, ds_stride);
    const uint32_t* kp = k + ch * kAmxRows * d;
    CPUATTN_AMX_DQ(0);
    if constexpr (NT > 1) CPUATTN_AMX_DQ(1);
    if constexpr (NT > 2) CPUATTN_AMX_DQ(2);
    if constexpr (NT > 3) CPUATTN_AMX_DQ(3);
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NT > 1) _tile_stored(1, c + 16, c_stride);
  if constexpr (NT > 2) _tile_stored(2, c + 32, c_stride);
  if constexpr (NT > 3) _tile_stored(3, c + 48, c_stride);
}
#undef CPUATTN_AMX_DQ

// dq[rows x d] (d apart) += dS . K, 16 rows and 64 columns at a time (d a multiple of 32).
// A block with fewer than 16 rows goes through a local copy: the tile unit writes all 16.
inline void accumulate_dq(float* dq, int64_t rows, int64_t d, const Bf16Rows& ds, const uint32_t* k,
                          int64_t chunks) {
  alignas(64) float part[kAmxRows][64];
  for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
    const int64_t n = rows - r0 < kAmxRows ? rows - r0 : kAmxRows;
    for (int64_t e0 = 0; e0 < d; e0 += 64) {
      const int nt = d - e0 >= 64 ? 4 : 2;
      float* c = dq + r0 * d + e0;
      int64_t c_stride = d * 4;
      if (n < kAmxRows) {
        for (int64_t r = 0; r < kAmxRows; ++r) {
          for (int64_t e = 0; e < 16 * nt; ++e) part[r][e] = r < n ? c[r * d + e] : 0.0f;
        }
        memory_barrier();
        c = part[0];
        c_stride = 64 * 4;
      }
      if (nt == 4) {
        dq_block<4>(c, c_stride, ds[r0], k + e0, d, chunks);
      } else {
        dq_block<2>(c, c_stride, ds[r0], k + e0, d, chunks);
      }
      if (n < kAmxRows) {
        memory_barrier();
        float* to = dq + r0 * d + e0;
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t e = 0; e < 16 * nt; ++e) to[r * d + e] = part[r][e];
        }
      }
    }
  }
}

// Rows [0, rows) of x (kTileKeys floats a row) -> query row pairs, rows past `rows` up to
// `pair_rows` zero.
inline void to_row_pairs(const float* x, int64_t rows, int64_t pair_rows, RowPairs& pairs) {
  constexpr int64_t W = cpuattn::kTileKeys;
  // Words 0-15 of the conversion are the even row's, 16-31 the odd row's: interleave them.
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t i = 0; i < pair_rows / 2; ++i) {
    const float* even = x + 2 * i * W;
    const bool has_even = 2 * i < rows, has_odd = 2 * i + 1 < rows;
    for (int64_t c = 0; c < W; c += 16) {
      const __m512 a = has_even ? _mm512_load_ps(even + c) : _mm512_setzero_ps();
      const __m512 b = has_odd ? _mm512_load_ps(even + W + c) : _mm512_setzero_ps();
      const __m512i h = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      _mm512_store_si512(pairs[i] + c, h);
    }
  }
}

// Rows [0, rows) of x -> bfloat16 rows, rows past `rows` up to `padded` zero.
inline void to_rows(const float* x, int64_t rows, int64_t padded, Bf16Rows& out) {
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = 0; r < padded; ++r) {
    for (int64_t c = 0; c < W; c += 32) {
      const __m512 a = r < rows ? _mm512_load_ps(x + r * W + c) : _mm512_setzero_ps();
      const __m512 b = r < rows ? _mm512_load_ps(x + r * W + c + 16) : _mm512_setzero_ps();
      _mm512_store_si512(out[r] + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

void backward_step_amx(const cpuattn::BackwardStep<float>& b) {
  const cpuattn::TileStep<float>& a = b.scores;
  const cpuattn::Bf16BackwardOperands& x = *b.amx;
  const int64_t row_blocks16 = (a.rows + kAmxRows - 1) / kAmxRows * kAmxRows;
  const int64_t row_chunks = (a.rows + 31) / 32, key_chunks = (a.cols + 31) / 32;
  memory_barrier();  // the driver's plain stores of the operands
  rows_times_keys(x.q, a.d, x.kt, a.s, a.rows);
  rows_times_keys(x.dout, a.dv, x.vt, b.dp, a.rows);
  memory_barrier();  // the tile stores, read below by plain loads
  weights_from_scores<float, true>(b);
  softmax_gradient(b);

  alignas(64) RowPairs p, ds;
  alignas(64) Bf16Rows ds_rows;
  to_row_pairs(a.s, a.rows, row_chunks * 32, p);
  to_row_pairs(b.dp, a.rows, row_chunks * 32, ds);
  to_rows(b.dp, a.rows, row_blocks16, ds_rows);
  memory_barrier();
  accumulate_transposed(x.dout_t, a.dv, p, x.dv_t, row_chunks);
  accumulate_transposed(x.q_t, a.d, ds, x.dk_t, row_chunks);
  accumulate_dq(b.dq, a.rows, a.d, ds_rows, x.k, key_chunks);
}
