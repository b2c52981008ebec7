// What the backward's bfloat16 products share, whichever unit multiplies (Bf16BackwardKernels:
// AMX tiles in amx_backward_step.inl, vdpbf16ps in dpbf16_backward_step.inl): the weights part
// (S and dP from the operands, the float32 step's softmax and gradient, P and dS rounded to
// bfloat16 as pairs of query rows and dS as rows) around the ISA's product, and the
// conversions it ends with. Include after tile_step.inl (backward_step.inl) with AVX512-BF16.

// ds_rows is zero past the pair's rows up to a whole block of this many (the tile unit's rows).
constexpr int64_t kDsRowBlock = 16;

// Rows [0, rows) of x (kTileKeys floats a row) -> query row pairs (kTileKeys a row: rows 2i
// and 2i + 1 of x in the low and high halves of row i), rows past `rows` up to `pair_rows`
// zero: the tile unit's B operand with the query rows as its inner dimension.
inline void to_row_pairs(const float* x, int64_t rows, int64_t pair_rows, uint32_t* pairs) {
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
      _mm512_store_si512(pairs + i * W + c, h);
    }
  }
}

// Rows [0, rows) of x -> bfloat16 rows (kTileKeys a row), rows past `rows` up to `padded`
// zero: the tile unit's A operand.
inline void to_rows(const float* x, int64_t rows, int64_t padded, uint16_t* out) {
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = 0; r < padded; ++r) {
    for (int64_t c = 0; c < W; c += 32) {
      const __m512 a = r < rows ? _mm512_load_ps(x + r * W + c) : _mm512_setzero_ps();
      const __m512 b = r < rows ? _mm512_load_ps(x + r * W + c + 16) : _mm512_setzero_ps();
      _mm512_store_si512(out + r * W + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
  }
}

// Bf16BackwardKernels::weights around RowsTimesKeys(a, k, b, c, rows): c[r, 0 .. kTileKeys) =
// a[r, :] . b for r < rows (at least), a rows of k bfloat16 and b k / 2 x kTileKeys pairs,
// bare products (scores times dot_scale follow in weights_from_scores).
template <void (*RowsTimesKeys)(const uint16_t*, int64_t, const uint32_t*, float*, int64_t)>
void backward_weights_bf16(const cpuattn::BackwardStep<float>& b, uint32_t* p, uint32_t* ds,
                           uint16_t* ds_rows) {
  const cpuattn::TileStep<float>& a = b.scores;
  const cpuattn::Bf16BackwardOperands& x = *b.bf16_operands;
  const int64_t row_pairs = (a.rows + 31) / 32 * 32;
  RowsTimesKeys(x.q, a.d, x.kt, a.s, a.rows);
  RowsTimesKeys(x.dout, a.dv, x.vt, b.dp, a.rows);
  weights_from_scores<float, true>(b);
  softmax_gradient(b);
  to_row_pairs(a.s, a.rows, row_pairs, p);
  to_row_pairs(b.dp, a.rows, row_pairs, ds);
  to_rows(b.dp, a.rows, (a.rows + kDsRowBlock - 1) / kDsRowBlock * kDsRowBlock, ds_rows);
}
