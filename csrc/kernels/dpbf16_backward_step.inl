// The backward's five products (Bf16BackwardKernels) with AVX512-BF16's vdpbf16ps, for CPUs
// without the tile unit (AMD Zen 4): the operands the driver prepares for AMX are already the
// layouts vdpbf16ps wants. The tile unit's B operand (pairs along the inner dimension, a row
// of pairs per step) is loaded as vectors, its A operand (rows of bfloat16) broadcast a pair
// at a time, and a block of rows x columns of float32 sums stays in registers over every tile
// of a part, as the tile registers do in amx_backward_step.inl. Same roundings as there: the
// products are exact, the sums float32, P and dS rounded to bfloat16 by the weights part.
// Include after bf16_step.inl (dot_pairs) and bf16_backward_weights.inl.

// Rows of the register block: RB x CB sums, CB B vectors and a broadcast fit 32 registers
// (4 x 4 + 4 + 1) with loads well under the products' issue rate (6 rows measured no faster on
// Zen 4, where the products already run at about twice its measured sgemm rate: vdpbf16ps's
// peak).
constexpr int kPairRows = 4;

// Two consecutive bfloat16 (the first in the low half) in every lane.
inline __m512i broadcast_pair(const uint16_t* x) {
  uint32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  return _mm512_set1_epi32(static_cast<int>(pair));
}

// c[r, e0 .. e0 + 16 CB) for RB rows (ldc apart) = (c if kAccumulate, else 0) + the sum over
// t < n of a[t] (RB rows of 2 pairs[t] bfloat16, lda elements apart) . b[t] (pairs[t] rows of
// pairs, ldb apart, from column e0). pairs[t] >= 1. `tail`: the columns of the last vector
// that exist (nothing past them is read or written).
template <int RB, int CB, bool kAccumulate>
inline void pair_product_block(float* c, int64_t ldc, int n, const uint16_t* const* a, int64_t lda,
                               const uint32_t* const* b, int64_t ldb, const int64_t* pairs,
                               int64_t e0, __mmask16 tail) {
  constexpr int64_t L = 16;
  constexpr int kLast = CB - 1;
  __m512 acc[RB][CB];
  for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < CB; ++k) {
      const float* from = c + r * ldc + e0 + k * L;
      acc[r][k] = !kAccumulate ? _mm512_setzero_ps()
                  : k < kLast  ? _mm512_loadu_ps(from)
                               : _mm512_maskz_loadu_ps(tail, from);
    }
  }
  for (int t = 0; t < n; ++t) {
    const uint16_t* at = a[t];
    const uint32_t* bt = b[t] + e0;
#pragma GCC unroll 4
    for (int64_t j = 0; j < pairs[t]; ++j) {
      __m512i bv[CB];
      for (int k = 0; k < CB; ++k) {
        const uint32_t* from = bt + j * ldb + k * L;
        bv[k] = k < kLast ? _mm512_loadu_si512(from) : _mm512_maskz_loadu_epi32(tail, from);
      }
      for (int r = 0; r < RB; ++r) {
        const __m512i av = broadcast_pair(at + r * lda + 2 * j);
        for (int k = 0; k < CB; ++k) acc[r][k] = dot_pairs(acc[r][k], av, bv[k]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int k = 0; k < kLast; ++k) _mm512_storeu_ps(c + r * ldc + e0 + k * L, acc[r][k]);
    _mm512_mask_storeu_ps(c + r * ldc + e0 + kLast * L, tail, acc[r][kLast]);
  }
}

// f(std::integral_constant<int, n>), n in [1, N].
template <int N, class F>
inline void with_count(int64_t n, const F& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// pair_product_block over rows [0, rows) and columns [0, cols) (cols even: whole pairs): 64
// columns at a time, then the rest (a masked last vector); kPairRows rows at a time, then the
// rest.
template <bool kAccumulate>
void pair_product(float* c, int64_t ldc, int64_t rows, int64_t cols, int n,
                  const uint16_t* const* a, int64_t lda, const uint32_t* const* b, int64_t ldb,
                  const int64_t* pairs) {
  const uint16_t* a_rows[cpuattn::kBf16BackwardMaxTiles];
  for (int64_t e0 = 0; e0 < cols; e0 += 64) {
    const int64_t width = cols - e0 < 64 ? cols - e0 : 64;
    const __mmask16 tail = static_cast<__mmask16>(width % 16 ? (1u << width % 16) - 1 : 0xffffu);
    for (int64_t r0 = 0; r0 < rows; r0 += kPairRows) {
      for (int t = 0; t < n; ++t) a_rows[t] = a[t] + r0 * lda;
      float* cr = c + r0 * ldc;
      with_count<kPairRows>(rows - r0, [&](auto rb) {
        with_count<4>((width + 15) / 16, [&](auto cb) {
          pair_product_block<decltype(rb)::value, decltype(cb)::value, kAccumulate>(
              cr, ldc, n, a_rows, lda, b, ldb, pairs, e0, tail);
        });
      });
    }
  }
}

// The weights part's products (backward_weights_bf16): c[rows x kTileKeys] = a . b.
inline void rows_times_keys_dp(const uint16_t* a, int64_t k, const uint32_t* b, float* c,
                               int64_t rows) {
  const int64_t pairs = k / 2;
  pair_product<false>(c, cpuattn::kTileKeys, rows, cpuattn::kTileKeys, 1, &a, k, &b,
                      cpuattn::kTileKeys, &pairs);
}

// Bf16BackwardKernels::dq: dq[rows x d] += the sum over n key tiles of ds_rows[i] (rows of
// kTileKeys bfloat16) . K_i (kTileKeys / 2 x d pairs), over key_chunks[i] 32-key chunks.
void accumulate_dq_dp(float* dq, int64_t rows, int64_t d, int n, const uint16_t* const* ds_rows,
                      const uint32_t* const* k, const int64_t* key_chunks) {
  int64_t pairs[cpuattn::kBf16BackwardMaxTiles];
  for (int t = 0; t < n; ++t) pairs[t] = key_chunks[t] * 16;
  pair_product<true>(dq, d, rows, d, n, ds_rows, cpuattn::kTileKeys, k, d, pairs);
}

// Bf16BackwardKernels::key_gradient: c[m x kTileKeys] += the sum over n query tiles of a[i]
// (m rows of kTileRows bfloat16: q^T or dO^T) . pairs[i] (query row pairs x kTileKeys), over
// row_chunks[i] 32-row chunks.
void accumulate_key_gradient_dp(float* c, int64_t m, int n, const uint16_t* const* a,
                                const uint32_t* const* row_pairs, const int64_t* row_chunks) {
  int64_t pairs[cpuattn::kBf16BackwardMaxTiles];
  for (int t = 0; t < n; ++t) pairs[t] = row_chunks[t] * 16;
  pair_product<true>(c, cpuattn::kTileKeys, m, cpuattn::kTileKeys, n, a, cpuattn::kTileRows,
                     row_pairs, cpuattn::kTileKeys, pairs);
}
