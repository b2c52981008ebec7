// The score epilogue every step shares (float, vdpbf16ps, AMX): softcap -> ALiBi -> mask ->
// key bounds -> online softmax over a stored block of scores. Part of tile_step.inl (its
// namespaces and linkage rules).
#ifndef CPUATTN_VEC_BYTES
#error "included by kernels/tile_step.inl only"
#endif

// 1 / x for finite x >= 1: AVX-512 float has a fast estimate refined to full precision;
// elsewhere divide.
template <typename V>
inline V inverse(V x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && sizeof(x[0]) == 4) return reciprocal(x);
#endif
  return 1 / x;
}

// 1 / (exp(t) + 1), the costly part of tanh(x) = 1 - 2 / (exp(2x) + 1): t clamped to
// [-80, 80] (tanh is +-1 in float and double well inside) so exp needs no range handling,
// NaN passed through (both comparisons are false for it).
template <typename V>
inline V inverse_exp_plus_one(V t) {
  using T = decltype(+t[0]);
  const V lo = V{} - T(80), hi = V{} + T(80);
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) {
    // vmaxps / vminps return their second operand when either is NaN: the same clamp in one
    // instruction each, where the conditionals below take a compare and a blend each. (mask
    // forms: the unmasked ones trip GCC 12's -Wmaybe-uninitialized)
    const __m512 low = _mm512_mask_max_ps((__m512)t, 0xffff, (__m512)lo, (__m512)t);
    t = (V)_mm512_mask_min_ps(low, 0xffff, (__m512)hi, low);
    return inverse(exp_lean<T>(t) + T(1));
  }
#endif
  t = lo > t ? lo : t;
  t = t > hi ? hi : t;
  return inverse(exp_lean<T>(t) + T(1));  // tanh's error: half e's relative error
}

template <typename V>
inline V fast_tanh(V x) {
  using T = decltype(+x[0]);
  return T(1) - T(2) * inverse_exp_plus_one(x * T(2));
}

// Softcap for cap > 0: cap * tanh(s / cap) = cap - 2 cap / (exp(2 s / cap) + 1), right at
// both infinities.
template <typename V, typename T>
inline V soft_cap(V s, T cap) {
  return cap - (2 * cap) * inverse_exp_plus_one(s * (2 / cap));
}

// ALiBi's linear distance penalty on rows [r0, r1), computed per key, before the mask.
template <typename T>
inline void add_alibi(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1, int64_t width) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  V lane;
  for (int i = 0; i < L; ++i) lane[i] = T(i);
  // Distances stay exact in float while below 2^24 (the NumPy backend rounds the exact int64
  // distance once); a row farther from its diagonal (diagonal= can put it anywhere) takes
  // each distance in int64 first.
  constexpr int64_t kExact = (int64_t(1) << 24) - W;
  for (int64_t r = r0; r < r1; ++r) {
    T* sr = a.s + r * W;
    const int64_t base = a.diag[r] - a.j0;
    if (base > kExact || base < -kExact) {
      const T slope = a.slopes[r];
      for (int64_t c = 0; c < width; ++c) {
        const int64_t dist = base - c;
        sr[c] -= slope * T(dist < 0 ? -dist : dist);
      }
      continue;
    }
    const V slope = S::splat(a.slopes[r]);
    const V from_diag = S::splat(T(base));
    for (int64_t c = 0; c < width; c += L) {
      const V dist = from_diag - (lane + T(c));
      S::store(sr + c, S::load(sr + c) - slope * (dist < V{} ? -dist : dist));
    }
  }
}

template <typename T>
inline T mask_value(const cpuattn::TileStep<T>& a, int64_t r, int64_t c, T s) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t off = (a.j0 + c) * a.mask_col_stride;
  if (a.mask_kind == cpuattn::MaskKind::Bool) {
    const bool keep = static_cast<const uint8_t*>(a.mask_rows[r])[off] != 0;
    return keep ? s : kNegInf;
  }
  // -inf drops the key outright, so a NaN score of a dropped key cannot reach the row.
  const T bias = static_cast<const T*>(a.mask_rows[r])[off];
  return bias == kNegInf ? kNegInf : s + bias;
}

// Bits [0, n) set, for 0 <= n <= 64.
inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1; }

// Applies the user mask and, on Partial tiles, the per-row key range (and the global keys) to
// rows [r0, r1); padding columns [cols, width) become -inf so the softmax can run over whole
// vectors.
template <typename T>
inline void mask_rows(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1, int64_t width) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = r0; r < r1; ++r) {
    T* sr = a.s + r * W;
    if (a.mask_kind != cpuattn::MaskKind::None) {
      for (int64_t c = 0; c < a.cols; ++c) sr[c] = mask_value(a, r, c, sr[c]);
    }
    if (a.apply_bounds) {  // keys outside [lo, hi): two runs of -inf, no test per element
      int64_t lo = a.bounds[r].lo - a.j0, hi = a.bounds[r].hi - a.j0;
      lo = lo < 0 ? 0 : (lo > a.cols ? a.cols : lo);  // no std::clamp: see the file's top
      hi = hi < lo ? lo : (hi > a.cols ? a.cols : hi);
      if (a.global_cols == 0) {
        for (int64_t c = 0; c < lo; ++c) sr[c] = kNegInf;
        for (int64_t c = hi; c < a.cols; ++c) sr[c] = kNegInf;
      } else {  // global keys below the row's cap stay: the kept columns as one bit mask
        int64_t cap = a.caps[r] - a.j0;
        cap = cap < 0 ? 0 : (cap > a.cols ? a.cols : cap);
        const uint64_t keep = (low_bits(hi) & ~low_bits(lo)) | (a.global_cols & low_bits(cap));
        for (int64_t c = 0; c < a.cols; ++c) sr[c] = (keep >> c & 1) != 0 ? sr[c] : kNegInf;
      }
    }
    for (int64_t c = a.cols; c < width; ++c) sr[c] = kNegInf;
  }
}

// o[0, n) *= alpha, for a row's running output when its max grew. A factor of exactly 0
// drops the old state outright (0 * inf must not become NaN), by vector stores: as a loop of
// zeros the compiler makes it a memset call, ~1% of a small-head call.
template <typename T>
inline void rescale_row(T* o, int64_t n, T alpha) {
  using S = Simd<T>;
  int64_t e = 0;
  if (alpha == T(0)) {
    for (; e + S::kLanes <= n; e += S::kLanes) S::store(o + e, typename S::V{});
    for (; e < n; ++e) o[e] = 0;
  } else {
    for (; e + S::kLanes <= n; e += S::kLanes) S::store(o + e, S::load(o + e) * alpha);
    for (; e < n; ++e) o[e] *= alpha;
  }
}

// Online softmax (Milakov & Gimelshein 2018; FlashAttention-2, arXiv 2307.08691) of rows
// [r0, r0 + N): per row, new max -> rescale factor exp(m_old - m_new) -> scale the
// accumulators -> p = exp(s - m_new). Leaves p in a.s for the P.V product. The row sums stay
// per lane (a.l holds kSumSlots partial sums a row; the driver adds them once at the end), so
// no tile needs a horizontal sum. Fixed order throughout: deterministic. Returns whether some
// p is exactly 0 (a dropped key, or one whose weight underflowed).
template <typename T, int N>
inline bool softmax_block(const cpuattn::TileStep<T>& a, int64_t r0, int64_t width) {
  using S = Simd<T>;
  using V = typename S::V;
  using R = Lanes<T, CPUATTN_VEC_BYTES>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  constexpr int kSlots = 16;  // >= N, a whole number of vectors
  static_assert(L <= cpuattn::kSumSlots && kSlots % L == 0 && N <= 8,
                "row sums and per-block row state must fit their slots");

  // Pass 1: every row's new running max. A plain max, which may skip NaN scores: they still
  // reach the row through p = exp(NaN - m) = NaN below (so no NaN test per element here).
  alignas(64) T m_old[kSlots] = {}, m_new[kSlots] = {}, alpha[kSlots], shift[kSlots];
  constexpr bool kFoldRows = L >= 8 && N > 1;
  V vmax[kFoldRows ? 8 : N];
  for (int i = 0; i < N; ++i) {
    const T* sr = a.s + (r0 + i) * W;
    vmax[i] = S::load(sr);
    for (int64_t c = L; c < width; c += L) {
      const V x = S::load(sr + c);
      vmax[i] = x > vmax[i] ? x : vmax[i];
    }
    m_old[i] = a.m[r0 + i];
    if constexpr (!kFoldRows) {
      const T tile_max = R::max(vmax[i]);
      m_new[i] = tile_max > m_old[i] ? tile_max : m_old[i];
    }
  }
  if constexpr (kFoldRows) {  // the rows' maxes folded together, one lane each
    for (int i = N; i < 8; ++i) vmax[i] = vmax[N - 1];
    const V tile_max = row_maxes8(vmax, std::make_integer_sequence<int, L>{});
    const V old = S::load(m_old);
    S::store(m_new, tile_max > old ? tile_max : old);
  }
  // Pass 2, L rows at a time: rescale factors exp(m_old - m_new) (0 on a row's first key) and
  // the shift of pass 3. A row with no finite score so far takes shift 0 and factor 1, so
  // its p = exp(s) is 0 for -inf (never exp(-inf - -inf)) and NaN for NaN, and its state
  // stays as it is.
  bool empty_row = false;
  for (int i = 0; i < N; i += L) {
    const V mn = S::load(m_new + i);
    const auto empty = mn == S::splat(kNegInf);  // lanes of all ones where true
    const V factor = fast_exp_vec<T>(S::load(m_old + i) - mn);
    S::store(alpha + i, empty ? S::splat(1) : factor);
    S::store(shift + i, empty ? V{} : mn);
    for (int k = 0; k < L && i + k < N; ++k) empty_row |= empty[k] != 0;
  }
  // Pass 3: p = exp(s - shift) and the row sums, one loop for every row (no test per row);
  // then each row's lazy rescale.
  V min_p = S::splat(1);  // a lane reaches 0 once some p is 0
  for (int i = 0; i < N; ++i) {
    const int64_t r = r0 + i;
    T* sr = a.s + r * W;
    V vsum = V{};
#pragma GCC unroll 16
    for (int64_t c = 0; c < width; c += L) {
      const V p = fast_exp_nonpositive<T>(S::load(sr + c) - S::splat(shift[i]));
      S::store(sr + c, p);
      vsum += p;
      min_p = p < min_p ? p : min_p;
    }
    T* l = a.l + r * cpuattn::kSumSlots;
    S::store(l, S::load(l) * alpha[i] + vsum);
    a.m[r] = m_new[i];
  }
  for (int i = 0; i < N; ++i) {
    if (alpha[i] != T(1)) rescale_row(a.o + (r0 + i) * a.dv, a.dv, alpha[i]);
  }
  return empty_row || R::min(min_p) == T(0);
}

// Softcap over rows [r0, r1) of a.s; with kDotScale the scores are first multiplied by
// a.dot_scale, in the same pass (the AMX tile unit stores bare products).
template <typename T, bool kDotScale>
inline void cap_scores(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1, int64_t width) {
  using S = Simd<T>;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const bool cap = a.softcap > 0;
  if (!kDotScale && !cap) return;
  for (int64_t r = r0; r < r1; ++r) {
    T* sr = a.s + r * W;
    // Columns past the ones the step wrote hold stale values (the scratch starts zeroed,
    // QueryStage::stage), which mask_rows sets to -inf.
    for (int64_t c = 0; c < width; c += L) {
      typename S::V s = S::load(sr + c);
      if constexpr (kDotScale) s *= a.dot_scale;
      S::store(sr + c, cap ? soft_cap(s, a.softcap) : s);
    }
  }
}

// The columns a step's scores and epilogue cover: cols rounded up to whole vectors (at least
// one), which is all the float and vdpbf16ps steps' P.V reads.
template <typename T>
inline int64_t score_width(const cpuattn::TileStep<T>& a) {
  constexpr int64_t L = Simd<T>::kLanes;
  static_assert(cpuattn::kMaxLanes % L == 0, "padded_keys covers every ISA's widths");
  return a.cols > 0 ? (a.cols + L - 1) / L * L : L;
}

// The epilogue over columns [0, width) of rows [r0, r0 + RB): inlined into score_epilogue's
// two cases, so that the whole tile's is a constant trip count (bounded by cols, the AMX
// bfloat16 step took 1.13-1.3x the time, measured).
template <typename T, int RB, bool kDotScale>
__attribute__((always_inline)) inline bool epilogue_columns(const cpuattn::TileStep<T>& a,
                                                            int64_t r0, int64_t width) {
  cap_scores<T, kDotScale>(a, r0, r0 + RB, width);
  if (a.slopes) add_alibi(a, r0, r0 + RB, width);
  mask_rows(a, r0, r0 + RB, width);
  return softmax_block<T, RB>(a, r0, width);
}

// The score epilogue of every step (float, vdpbf16ps and AMX): rows [r0, r0 + RB) of a.s, as
// the step's product block stored them, -> softcap -> ALiBi -> mask -> key bounds -> online
// softmax, leaving the weights in a.s. Returns whether some weight is exactly 0.
// Weights for the columns up to cols rounded up to whole vectors, which is all the float and
// vdpbf16ps steps use (a tile of 16 keys, a short sequence's, does a quarter of the exps);
// kWholeTile: all kTileKeys columns (the AMX step reads P in whole tiles of 32 keys). So some
// weight is 0 only where a key of [0, cols) has none: with an inf or NaN in V, a tile of 16,
// 32 or 48 keys that every row keeps now takes the fast P.V (in the vdpbf16ps step, other
// rounding than the inf-safe path it took before).
// It reads the stored rows rather than the step's registers, and is never inlined: work in a
// product block's store loop made GCC keep the block's accumulators on the stack, and so did
// an inlined softmax, its exp constants hoisted around score_rows (7 of its 24 accumulators
// in stack slots, AVX-512 float).
template <typename T, int RB, bool kDotScale = false, bool kWholeTile = false>
__attribute__((noinline)) bool score_epilogue(const cpuattn::TileStep<T>& a, int64_t r0) {
  constexpr int64_t W = cpuattn::kTileKeys, L = Simd<T>::kLanes;
  if (kWholeTile || a.cols > W - L) return epilogue_columns<T, RB, kDotScale>(a, r0, W);
  return epilogue_columns<T, RB, kDotScale>(a, r0, score_width(a));
}

// score_epilogue over any rows [r0, r1): rows are independent, so in for_row_blocks' blocks.
template <typename T, bool kDotScale = false, bool kWholeTile = false>
inline bool score_epilogue_rows(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
  bool some_zero = false;
  for_row_blocks(r1 - r0, [&](auto block, int64_t r, int64_t) {
    some_zero |= score_epilogue<T, decltype(block)::kRows, kDotScale, kWholeTile>(a, r0 + r);
  });
  return some_zero;
}
