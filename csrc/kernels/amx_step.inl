// The tile step on bfloat16 K and V with AMX (tdpbf16ps: a 16 x 16 float32 tile += a
// 16 x 32 bfloat16 tile times a 32 x 16 one, as pairs): the same operands and the same
// float32 softmax as bf16_step.inl, with both products on the tile unit, 16 query rows at a
// time. The driver pads D to whole 32-element chunks (zero pairs in q and K), and uses this
// step only when Dv is a multiple of 16. Include after bf16_step.inl.

// GCC spells the macros __AMX_TILE__ / __AMX_BF16__, Clang (14, measured here) __AMXTILE__ /
// __AMXBF16__.
#if !(defined(__AMX_TILE__) || defined(__AMXTILE__)) || \
    !(defined(__AMX_BF16__) || defined(__AMXBF16__))
#error "amx_step.inl needs -mamx-tile -mamx-bf16"
#endif

constexpr int64_t kAmxRows = 16;        // rows of a tile register
constexpr int64_t kAmxOutColumns = 16;  // float32 in a 64-byte tile row

// The GCC tile intrinsics are asm statements that do not tell the compiler which memory they
// read: a barrier first, so buffers written by plain stores are complete.
inline void memory_barrier() { __asm__ volatile("" ::: "memory"); }

// Palette 1, all 8 tiles 16 rows x 64 bytes, for this thread (KernelSet::amx_begin).
void configure_tiles() {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg = {};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kAmxRows;
  }
  memory_barrier();
  _tile_loadconfig(&cfg);
}

// s[r0 .. r0 + 16, 0 .. 64) = q . K^T, without dot_scale (the epilogue applies it: a tile
// store cannot scale). Tiles 0-3 hold the four 16-key column blocks; 4 holds q_hi, 6 q_lo,
// 5 and 7 K^T. Rows past a.rows compute from stale q rows and are never read.
template <bool kSplitQ>
inline void score_block_amx(const cpuattn::TileStep<float>& a, int64_t r0) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const int64_t q_stride = a.d_pairs * 4, k_stride = W * 4;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t e = 0; e < a.d_pairs; e += cpuattn::kAmxPairs) {
    _tile_loadd(4, a.q_hi + r0 * a.d_pairs + e, q_stride);
    if constexpr (kSplitQ) _tile_loadd(6, a.q_lo + r0 * a.d_pairs + e, q_stride);
    const uint32_t* k = elements<uint32_t>(a.key) + e * W;
    _tile_loadd(5, k, k_stride);
    _tile_loadd(7, k + 16, k_stride);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (kSplitQ) _tile_dpbf16ps(0, 6, 5);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kSplitQ) _tile_dpbf16ps(1, 6, 7);
    _tile_loadd(5, k + 32, k_stride);
    _tile_loadd(7, k + 48, k_stride);
    _tile_dpbf16ps(2, 4, 5);
    if constexpr (kSplitQ) _tile_dpbf16ps(2, 6, 5);
    _tile_dpbf16ps(3, 4, 7);
    if constexpr (kSplitQ) _tile_dpbf16ps(3, 6, 7);
  }
  float* s = a.s + r0 * W;
  _tile_stored(0, s, k_stride);
  _tile_stored(1, s + 16, k_stride);
  _tile_stored(2, s + 32, k_stride);
  _tile_stored(3, s + 48, k_stride);
}

// The same scores from K rows in place (decode: no K^T packing, which cost as much as the
// rest of the step): S^T = K . q^T with K rows as the A operand and q^T pairs as B, one
// 16-key block per output tile, then S^T transposed into s for the real rows [r0, r0 + n).
template <bool kSplitQ>
inline void score_block_amx_in_place(const cpuattn::TileStep<float>& a, int64_t r0, int64_t n) {
  constexpr int64_t W = cpuattn::kTileKeys, P = cpuattn::kAmxPairs;
  alignas(64) uint32_t qt_hi[P][kAmxRows], qt_lo[kSplitQ ? P : 1][kAmxRows];
  alignas(64) float st[W][kAmxRows];
  const int64_t k_stride = a.key.ld * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t e = 0; e < a.d_pairs; e += P) {
    for (int64_t pe = 0; pe < P; ++pe) {  // q^T pairs of this chunk, zero for padding rows
      for (int64_t r = 0; r < kAmxRows; ++r) {
        qt_hi[pe][r] = r < n ? a.q_hi[(r0 + r) * a.d_pairs + e + pe] : 0;
        if constexpr (kSplitQ) qt_lo[pe][r] = r < n ? a.q_lo[(r0 + r) * a.d_pairs + e + pe] : 0;
      }
    }
    memory_barrier();
    _tile_loadd(4, qt_hi, kAmxRows * 4);
    if constexpr (kSplitQ) _tile_loadd(6, qt_lo, kAmxRows * 4);
    const uint16_t* k = elements<uint16_t>(a.key) + 2 * e;
    for (int kb = 0; kb < 4; ++kb) {
      // Tile numbers are immediates: one branch per output tile.
      const uint16_t* rows = k + kb * kAmxRows * a.key.ld;
      _tile_loadd(5, rows, k_stride);
      switch (kb) {
        case 0:
          _tile_dpbf16ps(0, 5, 4);
          if constexpr (kSplitQ) _tile_dpbf16ps(0, 5, 6);
          break;
        case 1:
          _tile_dpbf16ps(1, 5, 4);
          if constexpr (kSplitQ) _tile_dpbf16ps(1, 5, 6);
          break;
        case 2:
          _tile_dpbf16ps(2, 5, 4);
          if constexpr (kSplitQ) _tile_dpbf16ps(2, 5, 6);
          break;
        default:
          _tile_dpbf16ps(3, 5, 4);
          if constexpr (kSplitQ) _tile_dpbf16ps(3, 5, 6);
          break;
      }
    }
  }
  _tile_stored(0, st[0], kAmxRows * 4);
  _tile_stored(1, st[16], kAmxRows * 4);
  _tile_stored(2, st[32], kAmxRows * 4);
  _tile_stored(3, st[48], kAmxRows * 4);
  for (int64_t r = 0; r < n; ++r) {
    float* s = a.s + (r0 + r) * W;
    for (int64_t j = 0; j < W; ++j) s[j] = st[j][r];
  }
}

// Multiplies tile register `t` (already holding o's block) by p . V for key chunk `chunk`
// (32 keys): A = p_hi (tile 4) and p_lo (tile 6), already loaded; B = V pairs (tile 5).
#define CPUATTN_AMX_PV(t, split)                        \
  do {                                                  \
    _tile_loadd(5, v + (t) * kAmxOutColumns, v_stride); \
    _tile_dpbf16ps(t, 4, 5);                            \
    if (split) _tile_dpbf16ps(t, 6, 5);                 \
  } while (0)

// o[r0 .. r0 + 16, e0 .. e0 + 16 * NT) += p . V, NT <= 4 output tiles (registers 0-3).
template <int NT, bool kSplitP>
inline void pv_block_amx(const cpuattn::TileStep<float>& a, int64_t r0, int64_t e0,
                         const uint32_t (*p_hi)[cpuattn::kTileKeys / 2],
                         const uint32_t (*p_lo)[cpuattn::kTileKeys / 2]) {
  const int64_t o_stride = a.dv * 4, v_stride = a.value.ld * 4,
                p_stride = cpuattn::kTileKeys / 2 * 4;
  float* o = a.o + r0 * a.dv + e0;
  _tile_loadd(0, o, o_stride);
  if constexpr (NT > 1) _tile_loadd(1, o + 16, o_stride);
  if constexpr (NT > 2) _tile_loadd(2, o + 32, o_stride);
  if constexpr (NT > 3) _tile_loadd(3, o + 48, o_stride);
  const int64_t key_pairs = (a.cols + 1) / 2;
  for (int64_t j = 0; j < key_pairs; j += kAmxRows) {  // 32 keys (16 pairs) a chunk
    _tile_loadd(4, p_hi[0] + j, p_stride);
    if constexpr (kSplitP) _tile_loadd(6, p_lo[0] + j, p_stride);
    const uint32_t* v = elements<uint32_t>(a.value) + j * a.value.ld + e0;
    CPUATTN_AMX_PV(0, kSplitP);
    if constexpr (NT > 1) CPUATTN_AMX_PV(1, kSplitP);
    if constexpr (NT > 2) CPUATTN_AMX_PV(2, kSplitP);
    if constexpr (NT > 3) CPUATTN_AMX_PV(3, kSplitP);
  }
  _tile_stored(0, o, o_stride);
  if constexpr (NT > 1) _tile_stored(1, o + 16, o_stride);
  if constexpr (NT > 2) _tile_stored(2, o + 32, o_stride);
  if constexpr (NT > 3) _tile_stored(3, o + 48, o_stride);
}
#undef CPUATTN_AMX_PV

// Rows [r0, r0 + n) of o += p . V from their weights' bfloat16 pairs (p_hi, p_lo: the
// block's 16 rows, zero past n, so padding rows add nothing to their unused output rows).
template <bool kSplitP>
inline void pv_rows_amx(const cpuattn::TileStep<float>& a, int64_t r0,
                        const uint32_t (*p_hi)[cpuattn::kTileKeys / 2],
                        const uint32_t (*p_lo)[cpuattn::kTileKeys / 2]) {
  int64_t e0 = 0;
  for (; e0 + 64 <= a.dv; e0 += 64) pv_block_amx<4, kSplitP>(a, r0, e0, p_hi, p_lo);
  switch ((a.dv - e0) / kAmxOutColumns) {
    case 3:
      pv_block_amx<3, kSplitP>(a, r0, e0, p_hi, p_lo);
      break;
    case 2:
      pv_block_amx<2, kSplitP>(a, r0, e0, p_hi, p_lo);
      break;
    case 1:
      pv_block_amx<1, kSplitP>(a, r0, e0, p_hi, p_lo);
      break;
    default:
      break;
  }
}

// Weights of rows [r0, r0 + n) -> bfloat16 pairs in p_hi (p_lo), rows [n, 16) zeroed.
template <bool kSplitP>
inline void round_block_weights(const cpuattn::TileStep<float>& a, int64_t r0, int64_t n,
                                uint32_t (*p_hi)[cpuattn::kTileKeys / 2],
                                uint32_t (*p_lo)[cpuattn::kTileKeys / 2]) {
  int64_t i = 0;
  // p_lo is one row when p is not split (never written then).
  for (; i + 4 <= n; i += 4) {
    round_weights<4, kSplitP>(a, r0 + i, p_hi + i, kSplitP ? p_lo + i : p_lo);
  }
  for (; i < n; ++i) round_weights<1, kSplitP>(a, r0 + i, p_hi + i, kSplitP ? p_lo + i : p_lo);
  for (; i < kAmxRows; ++i) {
    for (int64_t j = 0; j < cpuattn::kTileKeys / 2; ++j) {
      p_hi[i][j] = 0;
      if constexpr (kSplitP) p_lo[i][j] = 0;
    }
  }
}

void release_tiles() { _tile_release(); }

// Two phases: scores, epilogue and bfloat16 weights for every 16-row block, then every
// block's P.V. A tile load of weights that plain stores have just written waits for them
// to drain: block by block, that wait was half of the P.V time (measured, perf); with the
// other blocks' epilogues in between, the weights are in the cache when the tile unit asks.
template <bool kSplitQ, bool kSplitP>
void tile_step_amx_on(const cpuattn::TileStep<float>& a) {
  constexpr int64_t kBlocks = cpuattn::kTileRows / kAmxRows, W2 = cpuattn::kTileKeys / 2;
  alignas(64) uint32_t p_hi[kBlocks * kAmxRows][W2];
  alignas(64) uint32_t p_lo[kSplitP ? kBlocks * kAmxRows : 1][W2];
  bool done[kBlocks];  // the block's P.V is done (non-finite V: skipping zero weights)
  // V pair rows the tile unit reads: whole 16-pair chunks (pack_bf16_values zero-fills them).
  const int64_t pair_rows = ((a.cols + 1) / 2 + kAmxRows - 1) / kAmxRows * kAmxRows;
  // Whether those rows hold an inf or NaN: -1, unknown until needed, unless the source knows.
  int v_nonfinite =
      a.value.first_nonfinite_key < 0 ? -1 : a.value.first_nonfinite_key < 2 * pair_rows;
  const int64_t blocks = (a.rows + kAmxRows - 1) / kAmxRows;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * kAmxRows, n = a.rows - r0 < kAmxRows ? a.rows - r0 : kAmxRows;
    if (a.key.form == cpuattn::KeyForm::Rows) {
      score_block_amx_in_place<kSplitQ>(a, r0, n);
    } else {
      score_block_amx<kSplitQ>(a, r0);
    }
    done[b] = false;
    // The tile unit stores bare products: the epilogue multiplies them by dot_scale; and
    // it reads P in whole tiles (kWholeTile).
    // split_p: p_lo * inf would be NaN (pv_rows_bf16_skip_zero_weights).
    if (score_epilogue_rows<float, true, true>(a, r0, r0 + n) || kSplitP) {
      if (v_nonfinite < 0) v_nonfinite = tile_v2_has_nonfinite(a, pair_rows);
      if (v_nonfinite) {
        pv_rows_bf16_skip_zero_weights(a, r0, r0 + n);
        done[b] = true;
        continue;
      }
    }
    round_block_weights<kSplitP>(a, r0, n, p_hi + r0, p_lo + (kSplitP ? r0 : 0));
  }
  memory_barrier();  // weights and o's rescaled rows were written by plain stores
  for (int64_t b = 0; b < blocks; ++b) {
    if (!done[b]) {
      const int64_t r0 = b * kAmxRows;
      pv_rows_amx<kSplitP>(a, r0, p_hi + r0, p_lo + (kSplitP ? r0 : 0));
    }
  }
}

// q split in two bfloat16 (a float32 q) and p split (a float32 output), as the driver set
// them (bf16_step.inl), chosen once per step.
void tile_step_amx(const cpuattn::TileStep<float>& a) {
  if (a.q_lo) {
    a.split_p ? tile_step_amx_on<true, true>(a) : tile_step_amx_on<true, false>(a);
  } else {
    a.split_p ? tile_step_amx_on<false, true>(a) : tile_step_amx_on<false, false>(a);
  }
}
