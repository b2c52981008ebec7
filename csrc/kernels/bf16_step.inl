// The tile step on bfloat16 K and V with AVX512-BF16 dot products (vdpbf16ps: per float32
// lane, acc += a0 * b0 + a1 * b1 over a pair of bfloat16, products exact, sum in float32).
// Operands are pairs in uint32 (low half the even element): K^T pairs along D, V pairs along
// keys, so both products need half the instructions of the float32 step. Scores, softmax and
// the output stay float32. p is rounded to bfloat16 for P.V (relative error <= 2^-9 a weight)
// when the output is bfloat16 anyway; for a float32 output p is split into two bfloat16
// (p_hi + p_lo, 2^-17), as is a float32 q: twice the products, float32 accuracy. Include after
// tile_step.inl and convert.h, inside tile_step.inl's namespaces.

#if !defined(__AVX512BF16__)
#error "bf16_step.inl needs -mavx512bf16"
#endif

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// s[r0 + r, c0 : c0 + 16 CB] = dot_scale * (q_hi + q_lo)[r0 + r, :] . K^T[:, c0 : ...], for RB
// rows. q_lo (the rounding error of a float32 q, as bfloat16) is nullptr when q is bfloat16
// already.
template <int RB, int CB, bool kSplitQ>
__attribute__((always_inline)) inline void score_block_bf16(const cpuattn::TileStep<float>& a,
                                                            int64_t r0, int64_t c0) {
  constexpr int64_t W = cpuattn::kTileKeys, L = 16;
  const int64_t pairs = a.d_pairs;
  const uint32_t* qh = a.q_hi + r0 * pairs;
  const uint32_t* ql = kSplitQ ? a.q_lo + r0 * pairs : nullptr;
  const __m512 scale = _mm512_set1_ps(a.dot_scale);
  if (pairs <= 0) {
    // D = 0: every score is 0 (times the scale, as below). A branch of its own: with the
    // empty loop reaching the stores below, GCC keeps acc in a stack array.
    const __m512 s = _mm512_mul_ps(_mm512_setzero_ps(), scale);
    for (int r = 0; r < RB; ++r) {
      for (int c = 0; c < CB; ++c) _mm512_storeu_ps(a.s + (r0 + r) * W + c0 + c * L, s);
    }
    return;
  }
  __m512 acc[RB][CB];
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) acc[r][c] = _mm512_setzero_ps();
  }
#pragma GCC unroll 4
  for (int64_t e = 0; e < pairs; ++e) {
    __m512i kv[CB];
    for (int c = 0; c < CB; ++c)
      kv[c] = _mm512_loadu_si512(elements<uint32_t>(a.key) + e * W + c0 + c * L);
    for (int r = 0; r < RB; ++r) {
      const __m512i qe = _mm512_set1_epi32(static_cast<int>(qh[r * pairs + e]));
      for (int c = 0; c < CB; ++c) acc[r][c] = dot_pairs(acc[r][c], qe, kv[c]);
      if constexpr (kSplitQ) {
        const __m512i qe_lo = _mm512_set1_epi32(static_cast<int>(ql[r * pairs + e]));
        for (int c = 0; c < CB; ++c) acc[r][c] = dot_pairs(acc[r][c], qe_lo, kv[c]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) {
      _mm512_storeu_ps(a.s + (r0 + r) * W + c0 + c * L, _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

// score_block_bf16 over the columns of a tile narrower than kTileKeys (score_width), out of
// line as the float step's score_rows_narrow. Columns past them keep what they held:
// round_weights converts whole 32-column chunks, but P.V stops at the tile's (cols + 1) / 2
// pairs, whose weights the epilogue wrote (V pairs past cols may hold later keys).
template <int RB, bool kSplitQ>
__attribute__((noinline)) void score_rows_bf16_narrow(const cpuattn::TileStep<float>& a,
                                                      int64_t r0) {
  for_column_blocks<float>(score_width(a), [&](auto block, int64_t c0) {
    score_block_bf16<RB, decltype(block)::kVectors, kSplitQ>(a, r0, c0);
  });
}

// Scores of RB rows over the columns score_width covers.
template <int RB, bool kSplitQ>
inline void score_rows_bf16(const cpuattn::TileStep<float>& a, int64_t r0) {
  static_assert(cpuattn::kTileKeys == 16 * 4, "one column block covers the tile");
  if (score_width(a) < cpuattn::kTileKeys) {
    score_rows_bf16_narrow<RB, kSplitQ>(a, r0);
  } else {
    score_block_bf16<RB, 4, kSplitQ>(a, r0, 0);
  }
}

// x rounded to bfloat16 (nearest even, as vcvtne2ps2bf16 for all but NaN), as float32.
// Vector extensions rather than _mm512 shifts, which GCC 12 flags as reading uninitialized.
inline __m512 round_to_bf16(__m512 x) {
  typedef uint32_t U __attribute__((vector_size(64)));
  const U bits = reinterpret_cast<U>(x);
  const U up = bits + 0x7fffu + ((bits >> 16) & 1u);
  return reinterpret_cast<__m512>(up & 0xffff0000u);
}

// p (float32, rows r0.. of a.s) -> bfloat16 pairs of consecutive keys, rounded to nearest
// even, into p_hi; with kSplitP also the rounding error p - p_hi, rounded, into p_lo.
template <int RB, bool kSplitP>
inline void round_weights(const cpuattn::TileStep<float>& a, int64_t r0,
                          uint32_t (*p_hi)[cpuattn::kTileKeys / 2],
                          uint32_t (*p_lo)[cpuattn::kTileKeys / 2]) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const int64_t width = (a.cols + 31) / 32 * 32;  // the pairs P.V reads: (cols + 1) / 2
  for (int r = 0; r < RB; ++r) {
    const float* sr = a.s + (r0 + r) * W;
    for (int64_t c = 0; c < width; c += 32) {
      const __m512 x0 = _mm512_loadu_ps(sr + c), x1 = _mm512_loadu_ps(sr + c + 16);
      const __m512i h = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
      _mm512_storeu_si512(p_hi[r] + c / 2, h);
      if constexpr (kSplitP) {
        const __m512 e0 = _mm512_sub_ps(x0, round_to_bf16(x0));
        const __m512 e1 = _mm512_sub_ps(x1, round_to_bf16(x1));
        _mm512_storeu_si512(p_lo[r] + c / 2,
                            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(e1, e0)));
      }
    }
  }
}

// o[r0 + r, e0 : e0 + CB * 16] += p . V for RB rows, p = p_hi (+ p_lo with kSplitP);
// `tail` masks the last vector's columns.
template <int RB, int CB, bool kSplitP>
inline void pv_block_bf16(const cpuattn::TileStep<float>& a, int64_t r0, int64_t e0,
                          const uint32_t (*p_hi)[cpuattn::kTileKeys / 2],
                          const uint32_t (*p_lo)[cpuattn::kTileKeys / 2], __mmask16 tail) {
  constexpr int64_t L = 16;
  const int64_t key_pairs = (a.cols + 1) / 2;
  if (key_pairs <= 0) return;  // never, but without it GCC keeps acc in a stack array
  __m512 acc[RB][CB];
  for (int r = 0; r < RB; ++r) {
    float* o = a.o + (r0 + r) * a.dv + e0;
    for (int c = 0; c < CB; ++c) {
      acc[r][c] = c + 1 < CB ? _mm512_loadu_ps(o + c * L) : _mm512_maskz_loadu_ps(tail, o + c * L);
    }
  }
#pragma GCC unroll 4
  for (int64_t j = 0; j < key_pairs; ++j) {
    __m512i vv[CB];
    for (int c = 0; c < CB; ++c)
      vv[c] = _mm512_loadu_si512(elements<uint32_t>(a.value) + j * a.value.ld + e0 + c * L);
    for (int r = 0; r < RB; ++r) {
      const __m512i p = _mm512_set1_epi32(static_cast<int>(p_hi[r][j]));
      for (int c = 0; c < CB; ++c) acc[r][c] = dot_pairs(acc[r][c], p, vv[c]);
      if constexpr (kSplitP) {
        const __m512i p_rest = _mm512_set1_epi32(static_cast<int>(p_lo[r][j]));
        for (int c = 0; c < CB; ++c) acc[r][c] = dot_pairs(acc[r][c], p_rest, vv[c]);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    float* o = a.o + (r0 + r) * a.dv + e0;
    for (int c = 0; c < CB; ++c) {
      if (c + 1 < CB) {
        _mm512_storeu_ps(o + c * L, acc[r][c]);
      } else {
        _mm512_mask_storeu_ps(o + c * L, tail, acc[r][c]);
      }
    }
  }
}

// Packed V rows are a.value.ld >= dv wide, a whole number of vectors, zero past dv: the last
// vector of a row reads padding and only its first dv % 16 lanes are kept.
template <int RB, bool kSplitP>
inline void pv_rows_bf16(const cpuattn::TileStep<float>& a, int64_t r0) {
  constexpr int64_t L = 16;
  const __mmask16 all = 0xffff;
  uint32_t p_hi[RB][cpuattn::kTileKeys / 2], p_lo[kSplitP ? RB : 1][cpuattn::kTileKeys / 2];
  round_weights<RB, kSplitP>(a, r0, p_hi, p_lo);
  int64_t e0 = 0;
  for (; e0 + 4 * L <= a.dv; e0 += 4 * L) pv_block_bf16<RB, 4, kSplitP>(a, r0, e0, p_hi, p_lo, all);
  for (; e0 + 2 * L <= a.dv; e0 += 2 * L) pv_block_bf16<RB, 2, kSplitP>(a, r0, e0, p_hi, p_lo, all);
  for (; e0 < a.dv; e0 += L) {
    const int64_t left = a.dv - e0;
    const __mmask16 tail = left >= L ? all : static_cast<__mmask16>((1u << left) - 1);
    pv_block_bf16<RB, 1, kSplitP>(a, r0, e0, p_hi, p_lo, tail);
  }
}

// Whether packed V holds an inf or NaN (exponent bits all ones) in its first `pair_rows` rows.
inline bool tile_v2_has_nonfinite(const cpuattn::TileStep<float>& a, int64_t pair_rows) {
  uint32_t found = 0;
  for (int64_t j = 0; j < pair_rows; ++j) {
    const uint32_t* row = elements<uint32_t>(a.value) + j * a.value.ld;
    for (int64_t e = 0; e < a.dv; ++e) {
      found |= (row[e] & 0x7f80u) == 0x7f80u;
      found |= (row[e] & 0x7f800000u) == 0x7f800000u;
    }
  }
  return found != 0;
}

// P.V skipping weights of exactly 0 (see pv_rows_skip_zero_weights), from packed pairs, with
// p rounded as in the fast path (or kept whole, as the split p_hi + p_lo nearly is). Taken
// for a tile whose V holds an inf or NaN when some weight is 0, and with split_p always: the
// split p_lo is exactly 0 wherever p is a bfloat16 value (the row's largest weight, 1), and
// the fast path's p_lo * inf would be NaN.
inline void pv_rows_bf16_skip_zero_weights(const cpuattn::TileStep<float>& a, int64_t r0,
                                           int64_t r1) {
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = r0; r < r1; ++r) {
    float* o = a.o + r * a.dv;
    for (int64_t j = 0; j < a.cols; ++j) {
      const float p = a.s[r * W + j];
      if (p == 0.0f) continue;
      const float p16 = a.split_p ? p : cpuattn::bf16_to_f32(cpuattn::f32_to_bf16(p));
      const uint32_t* row = elements<uint32_t>(a.value) + (j / 2) * a.value.ld;
      const int shift = j % 2 ? 16 : 0;
      for (int64_t e = 0; e < a.dv; ++e)
        o[e] += p16 * cpuattn::bf16_to_f32(uint16_t(row[e] >> shift));
    }
  }
}

// ---- Few query rows (decode): K and V rows read in place, nothing packed ----

// s[r0 + r, :] = dot_scale * (q_hi + q_lo)[r0 + r, :] . K[j, :] from K rows in place
// (a.key, key.ld apart or through its row table): pairs along D are consecutive elements of a K
// row, so each K vector feeds vdpbf16ps as loaded; the fold tree of simd.inl reduces the per-lane
// sums. The last D % 32 elements are read with a masked load (nothing past a row). With
// prefetch_next each K line read asks for the next tile's line (into L2).
template <int RB, bool kSplitQ>
inline void score_rows_bf16_in_place(const cpuattn::TileStep<float>& a, int64_t r0) {
  constexpr int W = cpuattn::kTileKeys, L = 16, KB = 4, kGroups = L / KB;
  const int64_t pairs = a.d_pairs, d_main = a.d / 32 * 32, left = a.d - d_main;
  const __mmask32 k_tail = static_cast<__mmask32>((uint64_t(1) << left) - 1);
  const __mmask16 q_tail = static_cast<__mmask16>((1u << ((left + 1) / 2)) - 1);
  const __m512 scale = _mm512_set1_ps(a.dot_scale);
  for (int64_t jb = 0; jb < a.cols; jb += L) {
    __m512 folded[RB][kGroups];
    for (int g = 0; g < kGroups; ++g) {
      const uint16_t* k[KB];
      const char* ahead[KB];  // the same keys' rows in the next tile
      for (int n = 0; n < KB; ++n) {
        const int64_t j = jb + g * KB + n < a.cols ? jb + g * KB + n : 0;  // past cols: any
        k[n] = row_of(a.key, elements<uint16_t>(a.key), j);  // row, masked later
        ahead[n] = a.prefetch_next ? next_row(a.key, j) : nullptr;
      }
      __m512 acc[RB][KB];
      for (int r = 0; r < RB; ++r) {
        for (int n = 0; n < KB; ++n) acc[r][n] = _mm512_setzero_ps();
      }
      auto accumulate = [&](int64_t e, const __m512i* kv, bool tail) {
        for (int r = 0; r < RB; ++r) {
          const uint32_t* qh = a.q_hi + (r0 + r) * pairs + e / 2;
          const __m512i q = tail ? _mm512_maskz_loadu_epi32(q_tail, qh) : _mm512_loadu_si512(qh);
          for (int n = 0; n < KB; ++n) acc[r][n] = dot_pairs(acc[r][n], q, kv[n]);
          if constexpr (kSplitQ) {
            const uint32_t* ql = a.q_lo + (r0 + r) * pairs + e / 2;
            const __m512i q2 = tail ? _mm512_maskz_loadu_epi32(q_tail, ql) : _mm512_loadu_si512(ql);
            for (int n = 0; n < KB; ++n) acc[r][n] = dot_pairs(acc[r][n], q2, kv[n]);
          }
        }
      };
      for (int64_t e = 0; e < d_main; e += 32) {
        __m512i kv[KB];
        for (int n = 0; n < KB; ++n) {
          kv[n] = _mm512_loadu_si512(k[n] + e);
          if (a.prefetch_next) __builtin_prefetch(ahead[n] + 2 * e, 0, 1);
        }
        accumulate(e, kv, false);
      }
      if (left > 0) {
        __m512i kv[KB];
        for (int n = 0; n < KB; ++n) kv[n] = _mm512_maskz_loadu_epi16(k_tail, k[n] + d_main);
        accumulate(d_main, kv, true);
      }
      for (int r = 0; r < RB; ++r) folded[r][g] = fold_tree<L, KB>(acc[r]);
    }
    for (int r = 0; r < RB; ++r) {
      const __m512 sums =
          in_key_order(fold_tree<L / KB, kGroups>(folded[r]), std::make_integer_sequence<int, L>{});
      _mm512_storeu_ps(a.s + (r0 + r) * W + jb, _mm512_mul_ps(sums, scale));
    }
  }
}

// Rows [r0, r0 + RB) against the tile: from packed pairs, or (decode) from K and V rows in
// place.
template <int RB>
inline void step_rows_bf16(const cpuattn::TileStep<float>& a, int64_t r0, int& v_nonfinite) {
  if (a.key.form == cpuattn::KeyForm::Rows) {
    if (a.q_lo) {
      score_rows_bf16_in_place<RB, true>(a, r0);
    } else {
      score_rows_bf16_in_place<RB, false>(a, r0);
    }
  } else if (a.q_lo) {
    score_rows_bf16<RB, true>(a, r0);
  } else {
    score_rows_bf16<RB, false>(a, r0);
  }
  const bool some_zero = score_epilogue<float, RB>(a, r0);
  if (a.value.form == cpuattn::ValueForm::Rows) {  // V rows in place: the float step's P.V,
                                                   // widening them as it loads
    weights_times_values<float, RB, Elem::Bf16>(a, r0, some_zero, v_nonfinite);
    return;
  }
  if (some_zero || a.split_p) {  // split_p: see pv_rows_bf16_skip_zero_weights
    if (v_nonfinite < 0) v_nonfinite = tile_v2_has_nonfinite(a, (a.cols + 1) / 2);
    if (v_nonfinite) {
      pv_rows_bf16_skip_zero_weights(a, r0, r0 + RB);
      return;
    }
  }
  if (a.split_p) {
    pv_rows_bf16<RB, true>(a, r0);
  } else {
    pv_rows_bf16<RB, false>(a, r0);
  }
}

inline void tile_step_bf16(const cpuattn::TileStep<float>& a) {
  // Whether the V rows of the keys it reads, (cols + 1) / 2 pairs, hold an inf or NaN: -1,
  // unknown until needed, unless the source knows.
  int v_nonfinite =
      a.value.first_nonfinite_key < 0 ? -1 : a.value.first_nonfinite_key < (a.cols + 1) / 2 * 2;
  for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t) {
    step_rows_bf16<decltype(block)::kRows>(a, r, v_nonfinite);
  });
}

// K rows [0, cols) (bfloat16, ld elements apart) -> K^T pairs: kt[e * kTileKeys + j] holds
// K[j, 2e] (low half) and K[j, 2e + 1] (high half), zero past cols and past d (to `pairs`
// rows). When rows start on 4-byte boundaries and d is even this is a 32-bit transpose, the
// float32 packing's code.
void pack_bf16_keys(const uint16_t* k, int64_t ld, int64_t cols, int64_t d, int64_t pairs,
                    uint32_t* kt) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const int64_t d_pairs = (d + 1) / 2;
  if (d % 2 == 0 && ld % 2 == 0 && reinterpret_cast<uintptr_t>(k) % 4 == 0) {
    pack_keys<uint32_t>(reinterpret_cast<const uint32_t*>(k), ld / 2, cols, d_pairs, kt, W);
  } else {
    for (int64_t e = 0; e < d_pairs; ++e) {
      for (int64_t j = 0; j < W; ++j) {
        uint32_t pair = 0;
        if (j < cols) {
          const uint16_t* row = k + j * ld;
          pair = row[2 * e] | (2 * e + 1 < d ? uint32_t(row[2 * e + 1]) << 16 : 0u);
        }
        kt[e * W + j] = pair;
      }
    }
  }
  for (int64_t i = d_pairs * W; i < pairs * W; ++i) kt[i] = 0;
}

// V rows [0, cols) (bfloat16, ld elements apart) -> pairs of consecutive keys:
// vt[(j / 2) * width + e] holds V[j, e] in its low (even j) or high (odd j) half; zero past
// dv (to width) and past cols, to a whole 16 pairs (the rows one AMX tile reads). Returns the
// first key whose V row holds an inf or NaN (exponent bits all ones), or -1, found on the way.
int64_t pack_bf16_values(const uint16_t* v, int64_t ld, int64_t cols, int64_t dv, int64_t width,
                         uint32_t* vt) {
  const __m512i exponent = _mm512_set1_epi16(0x7f80);
  const auto nonfinite = [](uint16_t x) { return (x & 0x7f80u) == 0x7f80u; };
  int64_t first = -1;
  const int64_t key_pairs = (cols + 1) / 2, padded = (key_pairs + 15) / 16 * 16;
  for (int64_t i = key_pairs * width; i < padded * width; ++i) vt[i] = 0;
  for (int64_t j = 0; j < key_pairs; ++j) {
    const uint16_t* even = v + 2 * j * ld;
    const uint16_t* odd = 2 * j + 1 < cols ? even + ld : nullptr;
    uint32_t* dst = vt + j * width;
    __mmask32 bad_even = 0, bad_odd = 0;
    int64_t e = 0;
    for (; e + 32 <= dv; e += 32) {  // interleave 32 columns of the two rows
      const __m512i x = _mm512_loadu_si512(even + e);
      const __m512i y = odd ? _mm512_loadu_si512(odd + e) : _mm512_setzero_si512();
      bad_even |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(x, exponent), exponent);
      bad_odd |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(y, exponent), exponent);
      const __m512i lo_idx =
          _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                           6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
      _mm512_storeu_si512(dst + e, _mm512_permutex2var_epi16(x, lo_idx, y));
      _mm512_storeu_si512(dst + e + 16, _mm512_permutex2var_epi16(x, hi_idx, y));
    }
    for (; e < dv; ++e) {
      const uint16_t lo = even[e], hi = odd ? odd[e] : uint16_t(0);
      dst[e] = uint32_t(lo) | uint32_t(hi) << 16;
      bad_even |= nonfinite(lo);
      bad_odd |= nonfinite(hi);
    }
    for (; e < width; ++e) dst[e] = 0;
    if (first < 0 && (bad_even || bad_odd)) first = bad_even ? 2 * j : 2 * j + 1;
  }
  return first;
}
