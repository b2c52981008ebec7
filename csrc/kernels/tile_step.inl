// Portable body of the tile step: register-blocked loops over GCC/Clang vector extensions,
// compiled once per ISA with that ISA's vector width (CPUATTN_VEC_BYTES, set by the includer).
// Include it inside namespace cpuattn::CPUATTN_TARGET and an anonymous namespace there only:
// every ISA's copy must have internal linkage, or the linker may merge an AVX-512 copy into the
// scalar path (target.h). No std:: function templates here (std::min, std::clamp) for the
// same reason: their instances are shared between translation units; std:: types and
// constants (numeric_limits, integer_sequence) emit no code and are fine. The includer
// includes kernels/kernel.h first (it brings the standard headers).
#if !defined(CPUATTN_TARGET) || defined(CPUATTN_TARGET_IS_BASELINE)
#error "a kernel defines CPUATTN_TARGET (its ISA's name) before any include (target.h)"
#endif

#include "exp.h"

#ifndef CPUATTN_VEC_BYTES
#error "define CPUATTN_VEC_BYTES (16, 32 or 64) before including tile_step.inl"
#endif

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(CPUATTN_VEC_BYTES)));
  static constexpr int kLanes = CPUATTN_VEC_BYTES / sizeof(T);
  static V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  // x - 0 == x exactly (also for -0), so the compiler drops the subtraction and can fold the
  // broadcast into the FMA's memory operand; 0 + x it must keep (0 + -0 is +0).
  static V splat(T x) { return x - V{}; }
};

// One float16 as float, exact (subnormals, inf, NaN kept) by bit arithmetic.
inline float f16_bits_to_float(uint16_t h) {
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  // Finite: the half's bits in float position, rebiased by 2^112 (exact, subnormals too);
  // inf / NaN: the float exponent all ones.
  float f;
  if (magnitude >= (0x7c00u << 13)) {
    f = __builtin_bit_cast(float, magnitude | 0x7f800000u);
  } else {
    f = __builtin_bit_cast(float, magnitude) * 0x1p112f;
  }
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, f) | ((h & 0x8000u) << 16));
}

template <Elem Stored, typename T, typename E>
inline T element(const E* p, int64_t i) {
  if constexpr (Stored == Elem::Compute) {
    return p[i];
  } else if constexpr (Stored == Elem::Bf16) {
    return __builtin_bit_cast(float, uint32_t(p[i]) << 16);
  } else {
    return f16_bits_to_float(p[i]);
  }
}

template <int L>
struct HalfLanes {
  typedef uint16_t Half __attribute__((vector_size(2 * L)));
  typedef uint32_t Wide __attribute__((vector_size(4 * L)));
};

// One vector of elements from p; float16 through F16C's vcvtph2ps where the ISA has it.
template <Elem Stored, typename T, typename E>
inline typename Simd<T>::V load_elements(const E* p) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  if constexpr (Stored == Elem::Compute) {
    return S::load(p);
  } else if constexpr (Stored == Elem::Bf16) {
    typename HalfLanes<L>::Half h;
    __builtin_memcpy(&h, p, sizeof(h));
    return __builtin_bit_cast(V, __builtin_convertvector(h, typename HalfLanes<L>::Wide) << 16);
  } else {
#if defined(__AVX512F__)
    if constexpr (L == 16) {  // maskz: the unmasked intrinsic trips GCC 12's warnings
      return (V)_mm512_maskz_cvtph_ps(0xffff,
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
#endif
#if defined(__F16C__)
    if constexpr (L == 8)
      return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
    V v;
    for (int i = 0; i < L; ++i) v[i] = f16_bits_to_float(p[i]);
    return v;
  }
}

// An operand's elements as type E.
template <typename E, typename Operand>
inline const E* elements(const Operand& x) {
  return static_cast<const E*>(x.data);
}

// The K and V rows a step reads (key.form Rows, value.form Rows): the compute type, or half.
template <Elem Stored, typename T>
inline auto key_rows(const cpuattn::TileStep<T>& a) {
  if constexpr (Stored == Elem::Compute) {
    return elements<T>(a.key);
  } else {
    return elements<uint16_t>(a.key);
  }
}
template <Elem Stored, typename T>
inline auto value_rows(const cpuattn::TileStep<T>& a) {
  if constexpr (Stored == Elem::Compute) {
    return elements<T>(a.value);
  } else {
    return elements<uint16_t>(a.value);
  }
}

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

// Register blocking: kRowBlock rows x kColBlock vectors of accumulators, plus kColBlock operand
// vectors and one broadcast. 6 x 4 + 4 + 1 = 29 of 32 AVX-512 registers; with 16 registers
// (AVX2, SSE) 6 x 2 + 2 + 1 = 15. Leftover rows go 4, then 1 at a time.
// The inner loops are unrolled 4x (#pragma below): +2% (D = 64) and +6% (D = 128) single
// thread, measured A/B.
constexpr int kRowBlock = 6;
constexpr int kColBlock = CPUATTN_VEC_BYTES == 64 ? 4 : 2;

// s[r0 + r, :] = q[r0 + r, :] . K^T over the padded tile width, for RB rows, as the sum over
// head dims [e0, e1): added to what s holds when kAccumulate (the same chain of FMAs, so the
// same bits, as one pass over all of D), and times dot_scale when `last` and q is in place.
template <typename T, int RB, bool kAccumulate = false>
inline void score_rows(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int64_t e1,
                       bool last) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  static_assert(W % (L * kColBlock) == 0, "tile width must be a whole number of column blocks");
  const T* q = a.q + r0 * a.q_ld;
  for (int64_t c0 = 0; c0 < W; c0 += L * kColBlock) {
    T* s = a.s + r0 * W + c0;
    V acc[RB][kColBlock] = {};
    if constexpr (kAccumulate) {
      for (int r = 0; r < RB; ++r) {
        for (int c = 0; c < kColBlock; ++c) acc[r][c] = S::load(s + r * W + c * L);
      }
    }
#pragma GCC unroll 4
    for (int64_t e = e0; e < e1; ++e) {
      V kv[kColBlock];
      for (int c = 0; c < kColBlock; ++c) kv[c] = S::load(elements<T>(a.key) + e * W + c0 + c * L);
      for (int r = 0; r < RB; ++r) {
        const V qe = S::splat(q[r * a.q_ld + e]);
        for (int c = 0; c < kColBlock; ++c) acc[r][c] += qe * kv[c];
      }
    }
    // Only the stores here; softcap and the rest come after, over the stored rows
    // (score_epilogue). With softcap (or a test per vector) inside this loop GCC kept acc in a
    // stack array, zeroed by rep stos and every vector stored and reloaded (a MiniLM batch
    // took 1.08x the time).
    if (last && a.q_in_place) {
      for (int r = 0; r < RB; ++r) {
        for (int c = 0; c < kColBlock; ++c) S::store(s + r * W + c * L, acc[r][c] * a.dot_scale);
      }
    } else {
      for (int r = 0; r < RB; ++r) {
        for (int c = 0; c < kColBlock; ++c) S::store(s + r * W + c * L, acc[r][c]);
      }
    }
  }
}

// The fold tree that turns L vectors of per-lane partial dot products into one vector of L
// sums: each level adds the two halves of every B-lane block of x and of y and packs the
// results side by side, so after log2(L) levels over inputs 0..L-1 (paired as 0+1, then
// (01)+(23), ...) lane i holds the sum of input bitrev(i). 2 shuffles + 1 add per pair.
constexpr int fold_source(int lane, int block, int lanes) {
  const int k = lane / block, w = lane % block, h = block / 2;
  return w < h ? k * block + w : lanes + k * block + (w - h);
}

template <int B, bool kMax = false, typename V, int... I>
inline V fold_level(V x, V y, std::integer_sequence<int, I...>) {
  constexpr int L = sizeof...(I);
  const V first = __builtin_shufflevector(x, y, fold_source(I, B, L)...);
  const V second = __builtin_shufflevector(x, y, (fold_source(I, B, L) + B / 2)...);
  if constexpr (kMax) {
    return first > second ? first : second;
  } else {
    return first + second;
  }
}

// Folds N vectors (a power of two) with levels of block B, B / 2, ...: pairs (0, 1), (2, 3),
// then pairs of those results, and so on.
template <int B, int N, typename V>
inline V fold_tree(const V* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    constexpr int L = sizeof(V) / sizeof(v[0][0]);
    V next[N / 2];
    for (int i = 0; i < N / 2; ++i) {
      next[i] = fold_level<B>(v[2 * i], v[2 * i + 1], std::make_integer_sequence<int, L>{});
    }
    return fold_tree<B / 2, N / 2>(next);
  }
}

constexpr int bit_reverse(int x, int bits) {
  int r = 0;
  for (int b = 0; b < bits; ++b) r |= ((x >> b) & 1) << (bits - 1 - b);
  return r;
}

constexpr int log2_of(int x) { return x <= 1 ? 0 : 1 + log2_of(x / 2); }

// Lane i < 8: the max over all lanes of v[i], for 8 vectors of L >= 8 lanes: the fold tree
// with max across the rows (23 operations at 16 lanes, against 8 rows x 8 for one row at a
// time), then the rows put in order (input i lands on lane L / 8 * bitrev(i)).
constexpr int row_max_lane(int i, int lanes) {
  return i < 8 ? lanes / 8 * ((i & 1) << 2 | (i & 2) | (i & 4) >> 2) : 0;
}

template <typename V, int... I>
inline V row_maxes8(const V* v, std::integer_sequence<int, I...> seq) {
  constexpr int L = sizeof...(I);
  static_assert(L >= 8, "a lane per row");
  V pairs[4], quads[2];
  for (int i = 0; i < 4; ++i) pairs[i] = fold_level<L, true>(v[2 * i], v[2 * i + 1], seq);
  for (int i = 0; i < 2; ++i) {
    quads[i] = fold_level<L / 2, true>(pairs[2 * i], pairs[2 * i + 1], seq);
  }
  V all = fold_level<L / 4, true>(quads[0], quads[1], seq);
  if constexpr (L == 16) all = fold_level<2, true>(all, all, seq);
  return __builtin_shufflevector(all, all, row_max_lane(I, L)...);
}

// The fold tree's output (lane i: input bitrev(i)) back in input order; the permutation is
// its own inverse.
template <typename V, int... I>
inline V in_key_order(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, bit_reverse(I, log2_of(sizeof...(I)))...);
}

// Scores from K rows in place (a.key, a.key.ld elements apart), for RB rows: the dot-product
// form, s[r, j] = q[r, :] . K[j, :], vectorized along D. For a few query rows (decode) this
// beats packing K^T, which costs a transposing pass over every K tile for only a few rows
// of products. Keys go L at a time, KB keys x RB rows of accumulators at once, folded part
// way; the rest of the tree and one permutation give the L scores in key order. The D % L
// trailing elements are added per score afterwards. With prefetch_next, each K line read
// asks for the same line of the next tile (into L2): the hardware prefetchers alone left
// decode at ~60% of the memory bandwidth.
template <typename T, int RB, Elem Stored>
inline void score_rows_in_place(const cpuattn::TileStep<T>& a, int64_t r0) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = cpuattn::kTileKeys, L = S::kLanes;
  constexpr int KB = kColBlock < L ? kColBlock : L;  // keys per register block
  constexpr int kGroups = L / KB;
  static_assert(W % L == 0 && (L & (L - 1)) == 0, "whole vectors of keys, lanes a power of 2");
  const T* q = a.q + r0 * a.d;  // packed: q_ld == d
  const auto* rows = key_rows<Stored>(a);
  const int64_t d_main = a.d / L * L;
  for (int64_t jb = 0; jb < a.cols; jb += L) {
    V folded[RB][kGroups];
    for (int g = 0; g < kGroups; ++g) {
      decltype(rows) k[KB];
      for (int n = 0; n < KB; ++n) {
        const int64_t j = jb + g * KB + n;
        k[n] = rows + (j < a.cols ? j : 0) * a.key.ld;  // past cols: any valid row, masked later
      }
      V acc[RB][KB] = {};
#pragma GCC unroll 2
      for (int64_t e = 0; e < d_main; e += L) {
        V kv[KB];
        for (int n = 0; n < KB; ++n) {
          kv[n] = load_elements<Stored, T>(k[n] + e);
          if (a.prefetch_next) __builtin_prefetch(k[n] + e + W * a.key.ld, 0, 1);
        }
        for (int r = 0; r < RB; ++r) {
          const V qv = S::load(q + r * a.d + e);
          for (int n = 0; n < KB; ++n) acc[r][n] += qv * kv[n];
        }
      }
      for (int r = 0; r < RB; ++r) folded[r][g] = fold_tree<L, KB>(acc[r]);
    }
    for (int r = 0; r < RB; ++r) {
      V sums =
          in_key_order(fold_tree<L / KB, kGroups>(folded[r]), std::make_integer_sequence<int, L>{});
      if (d_main < a.d) {
        for (int i = 0; i < L; ++i) {
          const auto* kr = rows + (jb + i < a.cols ? jb + i : 0) * a.key.ld;
          T tail = 0;
          for (int64_t e = d_main; e < a.d; ++e) tail += q[r * a.d + e] * element<Stored, T>(kr, e);
          sums[i] += tail;
        }
      }
      S::store(a.s + (r0 + r) * W + jb, sums);
    }
  }
}

// Bahdanau scores: s[r0 + r, :] = sum_e w[e] tanh(q[r0 + r, e] + K^T[e, :]), for RB rows; the
// same register blocking as score_rows, a tanh per term instead of a product.
template <typename T, int RB>
inline void additive_score_rows(const cpuattn::TileStep<T>& a, int64_t r0) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const T* q = a.q + r0 * a.d;  // packed: q_ld == d
  for (int64_t c0 = 0; c0 < W; c0 += L * kColBlock) {
    V acc[RB][kColBlock] = {};
    for (int64_t e = 0; e < a.d; ++e) {
      V kv[kColBlock];
      for (int c = 0; c < kColBlock; ++c) kv[c] = S::load(elements<T>(a.key) + e * W + c0 + c * L);
      const V w = S::splat(a.additive_w[e]);
      for (int r = 0; r < RB; ++r) {
        const V qe = S::splat(q[r * a.d + e]);
        for (int c = 0; c < kColBlock; ++c) acc[r][c] += w * fast_tanh(qe + kv[c]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      for (int c = 0; c < kColBlock; ++c) S::store(a.s + (r0 + r) * W + c0 + c * L, acc[r][c]);
    }
  }
}

// ALiBi's linear distance penalty on rows [r0, r1), computed per key, before the mask.
template <typename T>
inline void add_alibi(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  V lane;
  for (int i = 0; i < L; ++i) lane[i] = T(i);
  for (int64_t r = r0; r < r1; ++r) {
    T* sr = a.s + r * W;
    const V slope = S::splat(a.slopes[r]);
    const V from_diag = S::splat(T(a.diag[r] - a.j0));
    for (int64_t c = 0; c < a.cols; c += L) {  // mask_rows sets the columns past cols
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

// Applies the user mask and, on Partial tiles, the per-row key range to rows [r0, r1); padding
// columns past `cols` become -inf so the softmax can run over whole vectors.
template <typename T>
inline void mask_rows(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
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
      for (int64_t c = 0; c < lo; ++c) sr[c] = kNegInf;
      for (int64_t c = hi; c < a.cols; ++c) sr[c] = kNegInf;
    }
    for (int64_t c = a.cols; c < W; ++c) sr[c] = kNegInf;
  }
}

// Lane reductions by halving: log2(lanes) extract + op pairs, in registers.
template <int Offset, typename V, int... I>
inline auto take_lanes(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (I + Offset)...);
}

template <typename T, int Bytes>
struct Lanes {
  typedef T V __attribute__((vector_size(Bytes)));
  static constexpr int kHalf = Bytes / sizeof(T) / 2;
  static auto lo(V v) { return take_lanes<0>(v, std::make_integer_sequence<int, kHalf>{}); }
  static auto hi(V v) { return take_lanes<kHalf>(v, std::make_integer_sequence<int, kHalf>{}); }
  static T max(V v) {  // plain max and min: NaN lanes may be ignored
    const auto a = lo(v), b = hi(v);
    return Lanes<T, Bytes / 2>::max(a > b ? a : b);
  }
  static T min(V v) {
    const auto a = lo(v), b = hi(v);
    return Lanes<T, Bytes / 2>::min(a < b ? a : b);
  }
  static T sum(V v) { return Lanes<T, Bytes / 2>::sum(lo(v) + hi(v)); }
};
template <typename T>
struct Lanes<T, sizeof(T)> {
  typedef T V __attribute__((vector_size(sizeof(T))));
  static T max(V v) { return v[0]; }
  static T min(V v) { return v[0]; }
  static T sum(V v) { return v[0]; }
};

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
inline bool softmax_block(const cpuattn::TileStep<T>& a, int64_t r0) {
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
    for (int64_t c = L; c < W; c += L) {
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
    for (int64_t c = 0; c < W; c += L) {
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
inline void cap_scores(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
  using S = Simd<T>;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const bool cap = a.softcap > 0;
  if (!kDotScale && !cap) return;
  for (int64_t r = r0; r < r1; ++r) {
    T* sr = a.s + r * W;
    // Up to cols in whole vectors: the in-place score paths write no further, and mask_rows
    // sets the columns past cols.
    for (int64_t c = 0; c < a.cols; c += L) {
      typename S::V s = S::load(sr + c);
      if constexpr (kDotScale) s *= a.dot_scale;
      S::store(sr + c, cap ? soft_cap(s, a.softcap) : s);
    }
  }
}

// The score epilogue of every step (float, vdpbf16ps and AMX): rows [r0, r0 + RB) of a.s, as
// the step's product block stored them, -> softcap -> ALiBi -> mask -> key bounds -> online
// softmax, leaving the weights in a.s. Returns whether some weight is exactly 0.
// It reads the stored rows rather than the step's registers, and is never inlined: work in a
// product block's store loop made GCC keep the block's accumulators on the stack, and so did
// an inlined softmax, its exp constants hoisted around score_rows (7 of its 24 accumulators
// in stack slots, AVX-512 float).
template <typename T, int RB, bool kDotScale = false>
__attribute__((noinline)) bool score_epilogue(const cpuattn::TileStep<T>& a, int64_t r0) {
  cap_scores<T, kDotScale>(a, r0, r0 + RB);
  if (a.slopes) add_alibi(a, r0, r0 + RB);
  mask_rows(a, r0, r0 + RB);
  return softmax_block<T, RB>(a, r0);
}

// score_epilogue over any rows [r0, r1): rows are independent, so blocks of kRowBlock, then 4,
// then 1.
template <typename T, bool kDotScale = false>
inline bool score_epilogue_rows(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
  bool some_zero = false;
  int64_t r = r0;
  for (; r + kRowBlock <= r1; r += kRowBlock) {
    some_zero |= score_epilogue<T, kRowBlock, kDotScale>(a, r);
  }
  for (; r + 4 <= r1; r += 4) some_zero |= score_epilogue<T, 4, kDotScale>(a, r);
  for (; r < r1; ++r) some_zero |= score_epilogue<T, 1, kDotScale>(a, r);
  return some_zero;
}

// o[r0 + r, e0 : e0 + CB * L] += p[r0 + r, :cols] . V[:cols, e0 : e0 + CB * L], for RB rows.
// kPrefetch: a.prefetch_next, decided once per block rather than tested per key.
template <typename T, int RB, int CB, Elem Stored, bool kPrefetch>
inline void pv_block(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const auto* rows = value_rows<Stored>(a);
  if (a.cols <= 0) return;  // never, but without it GCC keeps acc in a stack array
  V acc[RB][CB];
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) acc[r][c] = S::load(a.o + (r0 + r) * a.dv + e0 + c * L);
  }
#pragma GCC unroll 4
  for (int64_t j = 0; j < a.cols; ++j) {
    V vv[CB];
    for (int c = 0; c < CB; ++c) {
      vv[c] = load_elements<Stored, T>(rows + j * a.value.ld + e0 + c * L);
      if (kPrefetch) __builtin_prefetch(rows + (j + W) * a.value.ld + e0 + c * L, 0, 1);
    }
    for (int r = 0; r < RB; ++r) {
      const V p = S::splat(a.s[(r0 + r) * W + j]);
      for (int c = 0; c < CB; ++c) acc[r][c] += p * vv[c];
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) S::store(a.o + (r0 + r) * a.dv + e0 + c * L, acc[r][c]);
  }
}

// pv_block over output columns [e0, e1) for RB rows: e0 a multiple of kColBlock vectors, e1
// too or dv (then blocks of 2 and 1 vectors and single columns finish the row).
template <typename T, int RB, Elem Stored, bool kPrefetch>
inline void pv_columns(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int64_t e1) {
  constexpr int64_t W = cpuattn::kTileKeys, L = Simd<T>::kLanes;
  for (; e0 + kColBlock * L <= e1; e0 += kColBlock * L) {
    pv_block<T, RB, kColBlock, Stored, kPrefetch>(a, r0, e0);
  }
  if constexpr (kColBlock > 2) {  // e.g. Dv = 32 on AVX-512: one block of 2, not 2 of 1
    for (; e0 + 2 * L <= e1; e0 += 2 * L) pv_block<T, RB, 2, Stored, kPrefetch>(a, r0, e0);
  }
  for (; e0 + L <= e1; e0 += L) pv_block<T, RB, 1, Stored, kPrefetch>(a, r0, e0);
  if (e0 == e1) return;
  const auto* rows = value_rows<Stored>(a);
  for (int r = 0; r < RB; ++r) {  // the last dv % L columns
    T* o = a.o + (r0 + r) * a.dv;
    for (int64_t j = 0; j < a.cols; ++j) {
      const T p = a.s[(r0 + r) * W + j];
      const auto* vr = rows + j * a.value.ld;
      for (int64_t e = e0; e < e1; ++e) o[e] += p * element<Stored, T>(vr, e);
    }
  }
}

// Whether V rows [0, cols) hold an inf or NaN (x - x is NaN exactly for those). Vector
// accumulators: a scalar chain of adds here cost as much as the tile's whole P.V.
template <typename T, Elem Stored>
inline bool tile_v_has_nonfinite(const cpuattn::TileStep<T>& a) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t L = S::kLanes;
  const auto* rows = value_rows<Stored>(a);
  V acc = V{};
  T tail = 0;
  for (int64_t j = 0; j < a.cols; ++j) {
    const auto* vr = rows + j * a.value.ld;
    int64_t e = 0;
    for (; e + L <= a.dv; e += L) {
      const V x = load_elements<Stored, T>(vr + e);
      acc += x - x;
    }
    for (; e < a.dv; ++e) tail += element<Stored, T>(vr, e) - element<Stored, T>(vr, e);
  }
  bool nonfinite = tail != tail;
  for (int64_t i = 0; i < L; ++i) nonfinite |= acc[i] != acc[i];
  return nonfinite;
}

// P.V for rows [r0, r1) that skips weights of exactly 0, so an inf or NaN in V reaches only
// the rows that give its key a weight (0 * inf would be NaN). Rare: only for such tiles.
template <typename T, Elem Stored>
inline void pv_rows_skip_zero_weights(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
  constexpr int64_t W = cpuattn::kTileKeys;
  const auto* rows = value_rows<Stored>(a);
  for (int64_t r = r0; r < r1; ++r) {
    T* o = a.o + r * a.dv;
    for (int64_t j = 0; j < a.cols; ++j) {
      const T p = a.s[r * W + j];
      if (p == T(0)) continue;
      const auto* vr = rows + j * a.value.ld;
      for (int64_t e = 0; e < a.dv; ++e) o[e] += p * element<Stored, T>(vr, e);
    }
  }
}

// o[r0 .. r0 + RB) += p . V from the weights score_epilogue left in a.s (some_zero: its
// result), V rows read as H says. v_nonfinite: whether the tile's V holds an inf or NaN, -1
// until a row first needs to know.
template <typename T, int RB, Elem Stored>
inline void weights_times_values(const cpuattn::TileStep<T>& a, int64_t r0, bool some_zero,
                                 int& v_nonfinite) {
  if (some_zero) {
    if (v_nonfinite < 0) v_nonfinite = tile_v_has_nonfinite<T, Stored>(a);  // once a tile
    if (v_nonfinite) {
      pv_rows_skip_zero_weights<T, Stored>(a, r0, r0 + RB);
      return;
    }
  }
  if (a.prefetch_next) {
    pv_columns<T, RB, Stored, true>(a, r0, 0, a.dv);
  } else {
    pv_columns<T, RB, Stored, false>(a, r0, 0, a.dv);
  }
}

// Rows [r0, r0 + RB) against the tile, start to finish: scores, epilogue, P.V. Working a few
// rows at a time keeps their scores, the packed K tile and the V tile in L1.
// Stored: how the K and V rows read in place are stored (key.form Rows and value.form Rows;
// a packed K^T is always in the compute type).
template <typename T, int RB, Elem Stored>
inline void step_rows(const cpuattn::TileStep<T>& a, int64_t r0, int& v_nonfinite) {
  if (Stored != Elem::Compute || a.key.form == cpuattn::KeyForm::Rows) {
    score_rows_in_place<T, RB, Stored>(a, r0);
  } else if (a.additive_w) {
    additive_score_rows<T, RB>(a, r0);
  } else {
    score_rows<T, RB>(a, r0, 0, a.d, true);
  }
  weights_times_values<T, RB, Stored>(a, r0, score_epilogue<T, RB>(a, r0), v_nonfinite);
}

// Walks a.prefetch over a step's row blocks: each block asks for its even share of every
// range's lines (divisions once per range and step, none per block or line).
class Prefetcher {
 public:
  template <typename T>
  Prefetcher(const cpuattn::TileStep<T>& a, int64_t blocks) {
    for (int i = 0; i < cpuattn::kPrefetchRanges; ++i) {
      const cpuattn::PrefetchRange& p = a.prefetch[i];
      left_[i] = p.lines;
      per_block_[i] = (p.lines + blocks - 1) / blocks;
      if (p.lines == 0) continue;
      row_lines_[i] = p.row_lines;
      stride_[i] = p.stride;
      row_[i] = p.at + p.first / p.row_lines * p.stride;
      col_[i] = p.first % p.row_lines;
    }
  }
  void block() {
    for (int i = 0; i < cpuattn::kPrefetchRanges; ++i) {
      const int64_t n = per_block_[i] < left_[i] ? per_block_[i] : left_[i];
      for (int64_t k = 0; k < n; ++k) {
        __builtin_prefetch(row_[i] + 64 * col_[i], 0, 2);
        __asm__ __volatile__("");  // GCC drops prefetches it can prove change nothing else
        if (++col_[i] == row_lines_[i]) {
          col_[i] = 0;
          row_[i] += stride_[i];
        }
      }
      left_[i] -= n;
    }
  }

 private:
  const char* row_[cpuattn::kPrefetchRanges] = {};
  int64_t col_[cpuattn::kPrefetchRanges] = {}, row_lines_[cpuattn::kPrefetchRanges] = {};
  int64_t stride_[cpuattn::kPrefetchRanges] = {};
  int64_t left_[cpuattn::kPrefetchRanges], per_block_[cpuattn::kPrefetchRanges];
};

// A tile's rows in register blocks: kRowBlock rows, then 4, then 1 at a time, as
// f(RowBlock<rows>{}, first row, block index).
template <int N>
struct RowBlock {
  static constexpr int kRows = N;
};
inline int64_t row_blocks(int64_t rows) {
  const int64_t tail = rows % kRowBlock;
  return rows / kRowBlock + tail / 4 + tail % 4;
}
template <typename F>
inline void for_row_blocks(int64_t rows, F&& f) {
  int64_t r = 0, b = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) f(RowBlock<kRowBlock>{}, r, b++);
  for (; r + 4 <= rows; r += 4) f(RowBlock<4>{}, r, b++);
  for (; r < rows; ++r) f(RowBlock<1>{}, r, b++);
}

// Row block by row block, each start to finish (step_rows): K rows in place, additive scores,
// and d + dv below kPhasedMinDims, where a tile's K^T and V stay in L1/L2 between blocks.
template <typename T, Elem Stored>
void tile_step_rows(const cpuattn::TileStep<T>& a) {
  int v_nonfinite = -1;  // unknown until some weight is 0
  Prefetcher prefetch(a, row_blocks(a.rows));
  for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t) {
    prefetch.block();
    step_rows<T, decltype(block)::kRows, Stored>(a, r, v_nonfinite);
  });
}

// Large heads take the tile phase by phase, so that each slice of K^T and V is read from L2
// once for all rows rather than once per row block (at D = 4096 a tile's K^T and V are 1 MiB
// each, and row-block order streamed them from L3 once per row block, 11 times a tile):
// scores with D in slices of kScoreDepth (a kScoreDepth x kTileKeys slice of K^T serves every
// row block, the partial scores accumulated in a.s: the same FMA chain, the same bits), then
// the epilogue, then P.V with Dv in slices of kValueWidth columns (kTileKeys x kValueWidth of
// V per slice).
// Measured on a Xeon (AVX-512, 2 cores), (1, 1, 512, D) float32: D = 4096 1.3x faster (one
// and two threads), D = 512 and 1024 the same either way; slices of 64 or 256 no better.
constexpr int64_t kPhasedMinDims = 1024;  // d + dv
constexpr int64_t kScoreDepth = 128;
constexpr int64_t kValueWidth = 128;

template <typename T>
void tile_step_phased(const cpuattn::TileStep<T>& a) {
  static_assert(kValueWidth % (kColBlock * Simd<T>::kLanes) == 0, "whole column blocks a slice");
  constexpr int64_t kMaxBlocks = cpuattn::kTileRows;  // rows <= kTileRows, blocks >= 1 row
  bool some_zero[kMaxBlocks];
  Prefetcher prefetch(a, row_blocks(a.rows));
  int64_t e0 = 0;
  do {  // once at least: with d = 0 the scores are 0, and they must be written
    const int64_t e1 = a.d - e0 > kScoreDepth ? e0 + kScoreDepth : a.d;
    for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t) {
      constexpr int RB = decltype(block)::kRows;
      if (e0 == 0) {
        prefetch.block();
        score_rows<T, RB, false>(a, r, e0, e1, e1 == a.d);
      } else {
        score_rows<T, RB, true>(a, r, e0, e1, e1 == a.d);
      }
    });
    e0 = e1;
  } while (e0 < a.d);
  int v_nonfinite = -1;
  for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t b) {
    constexpr int RB = decltype(block)::kRows;
    some_zero[b] = score_epilogue<T, RB>(a, r);
    // Rows that give a non-finite V row of their tile a weight of 0 skip it (whole rows).
    if (some_zero[b]) {
      if (v_nonfinite < 0) v_nonfinite = tile_v_has_nonfinite<T, Elem::Compute>(a);
      if (v_nonfinite) pv_rows_skip_zero_weights<T, Elem::Compute>(a, r, r + RB);
    }
  });
  const bool skipped = v_nonfinite > 0;
  for (int64_t c0 = 0; c0 < a.dv; c0 += kValueWidth) {
    const int64_t c1 = a.dv - c0 > kValueWidth ? c0 + kValueWidth : a.dv;
    for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t b) {
      constexpr int RB = decltype(block)::kRows;
      if (skipped && some_zero[b]) return;
      if (a.prefetch_next) {
        pv_columns<T, RB, Elem::Compute, true>(a, r, c0, c1);
      } else {
        pv_columns<T, RB, Elem::Compute, false>(a, r, c0, c1);
      }
    });
  }
}

// Keys as PackedT or Rows, values as Rows, both stored as the same Elem.
template <typename T>
void tile_step(const cpuattn::TileStep<T>& a) {
  if (a.key.form == cpuattn::KeyForm::PackedT && !a.additive_w && a.d + a.dv >= kPhasedMinDims) {
    tile_step_phased(a);
    return;
  }
  if constexpr (sizeof(T) == 4) {  // half K and V rows in place: decode on a half cache
    if (a.key.elem == Elem::F16) {
      tile_step_rows<T, Elem::F16>(a);
      return;
    }
    if (a.key.elem == Elem::Bf16) {
      tile_step_rows<T, Elem::Bf16>(a);
      return;
    }
  }
  tile_step_rows<T, Elem::Compute>(a);
}

// K rows [0, cols), ld elements apart, -> kt: d x kTileKeys (K transposed, so score columns
// are unit-stride), zero past cols. Blocks of 4 floats (2 doubles) are transposed in 16-byte
// registers: half the loads and stores of an element-by-element copy, which made decode (a
// fresh tile per few query rows) bound by this copy rather than by memory.
template <typename T>
void pack_keys(const T* k, int64_t ld, int64_t cols, int64_t d, T* kt) {
  constexpr int64_t W = cpuattn::kTileKeys;
  constexpr int B = 16 / sizeof(T);
  typedef T Q __attribute__((vector_size(16)));
  int64_t c = 0;
  for (; c + B <= cols; c += B) {
    int64_t e = 0;
    for (; e + B <= d; e += B) {
      Q r[B];
      for (int i = 0; i < B; ++i) __builtin_memcpy(&r[i], k + (c + i) * ld + e, 16);
      if constexpr (B == 4) {
        const Q t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5);
        const Q t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
        const Q t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5);
        const Q t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
        r[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
        r[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
        r[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
        r[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
      } else {
        const Q t0 = __builtin_shufflevector(r[0], r[1], 0, 2);
        r[1] = __builtin_shufflevector(r[0], r[1], 1, 3);
        r[0] = t0;
      }
      for (int i = 0; i < B; ++i) __builtin_memcpy(kt + (e + i) * W + c, &r[i], 16);
    }
    for (; e < d; ++e) {
      for (int i = 0; i < B; ++i) kt[e * W + c + i] = k[(c + i) * ld + e];
    }
  }
  for (; c < cols; ++c) {
    for (int64_t e = 0; e < d; ++e) kt[e * W + c] = k[c * ld + e];
  }
  for (int64_t e = 0; e < d; ++e) {
    for (int64_t j = cols; j < W; ++j) kt[e * W + j] = 0;
  }
}

// Half K or V rows -> float rows, dst[j * width + e] = src[j * ld + e]. Branch-free per element
// so the compiler vectorizes it for this ISA (the same values as convert.h's scalar helpers).
inline void convert_bf16_rows(const void* rows_in, int64_t ld, int64_t rows, int64_t width,
                              float* dst) {
  const auto* src = static_cast<const uint16_t*>(rows_in);
  for (int64_t j = 0; j < rows; ++j) {
    const uint16_t* s = src + j * ld;
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + j * width);
    for (int64_t e = 0; e < width; ++e) d[e] = uint32_t(s[e]) << 16;
  }
}

// float16: F16C's vcvtph2ps where the ISA has it (8 or 16 a time), bit arithmetic otherwise.
inline void convert_f16_rows(const void* rows_in, int64_t ld, int64_t rows, int64_t width,
                             float* dst) {
  const auto* src = static_cast<const uint16_t*>(rows_in);
  for (int64_t j = 0; j < rows; ++j) {
    const uint16_t* s = src + j * ld;
    float* d = dst + j * width;
    int64_t e = 0;
#if defined(__AVX512F__)
    for (; e + 16 <= width; e += 16) {
      // maskz: the unmasked intrinsic trips GCC 12's -Wmaybe-uninitialized
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + e));
      _mm512_storeu_ps(d + e, _mm512_maskz_cvtph_ps(0xffff, h));
    }
#endif
#if defined(__F16C__)
    for (; e + 8 <= width; e += 8) {
      _mm256_storeu_ps(d + e,
                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + e))));
    }
#endif
    for (; e < width; ++e) d[e] = f16_bits_to_float(s[e]);
  }
}

// y = x * a over n elements: whole vectors, then the n % L tail one element at a time.
template <typename T>
void scale_array(const T* x, T a, int64_t n, T* y) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) S::store(y + i, S::load(x + i) * a);
  for (; i < n; ++i) y[i] = x[i] * a;
}

// Row sums by halving the kSumSlots slots: slot i + half onto slot i, in vectors while a half
// fills whole vectors, then lanes (the same pairwise order at every ISA width); then each
// row's output scaled by 1 / sum.
template <typename T>
void finish_rows(const T* o, const T* slots, int64_t rows, int64_t dv, T* const* out, T* sums) {
  using S = Simd<T>;
  constexpr int kVectors = cpuattn::kSumSlots / S::kLanes;
  static_assert(kVectors * S::kLanes == cpuattn::kSumSlots, "whole vectors of partial sums");
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = slots + r * cpuattn::kSumSlots;
    typename S::V v[kVectors];
    for (int i = 0; i < kVectors; ++i) v[i] = S::load(row + i * S::kLanes);
    for (int n = kVectors / 2; n > 0; n /= 2) {
      for (int i = 0; i < n; ++i) v[i] += v[i + n];
    }
    sums[r] = Lanes<T, CPUATTN_VEC_BYTES>::sum(v[0]);
    if (out) scale_array(o + r * dv, sums[r] == T(0) ? T(0) : T(1) / sums[r], dv, out[r]);
  }
}

// The kernel's exp over an array (a test hook): full vectors, then 1-lane tail.
template <typename T>
void exp_array(const T* x, T* y, int64_t n) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) S::store(y + i, fast_exp_vec<T>(S::load(x + i)));
  for (; i < n; ++i) y[i] = fast_exp(x[i]);
}

// The kernel set of this ISA's portable code; the bfloat16 pair entries stay nullptr unless
// the includer fills them. constexpr, so every set is constant-initialized before any use.
constexpr cpuattn::KernelSet portable_kernels(const char* name) {
  cpuattn::KernelSet k{};
  k.name = name;
  k.step_f32 = &tile_step<float>;
  k.step_f64 = &tile_step<double>;
  k.pack_f32 = &pack_keys<float>;
  k.pack_f64 = &pack_keys<double>;
  k.encodings[int(Elem::F16)].to_float = &convert_f16_rows;
  k.encodings[int(Elem::Bf16)].to_float = &convert_bf16_rows;
  k.scale_f32 = &scale_array<float>;
  k.scale_f64 = &scale_array<double>;
  k.finish_f32 = &finish_rows<float>;
  k.finish_f64 = &finish_rows<double>;
  k.exp_f32 = &exp_array<float>;
  k.exp_f64 = &exp_array<double>;
  return k;
}
