// Vector helpers of the portable kernels: GCC/Clang vector types of the ISA's width, loads of
// K/V elements stored as float16 / bfloat16, the fold tree of dot-product lanes and lane
// reductions. Part of tile_step.inl (its namespaces and linkage rules).
#ifndef CPUATTN_VEC_BYTES
#error "included by kernels/tile_step.inl only"
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
  } else if constexpr (Stored == Elem::I8) {
    return T(p[i]);
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
  } else if constexpr (Stored == Elem::Bf16) {  // the bits moved up 16: exact
    // Intrinsics: GCC splits __builtin_convertvector into two halves and a lane insert
    // (AVX-512: 5 instructions instead of 2, measured as a third of decode's P.V time).
#if defined(__AVX512F__)
    if constexpr (L == 16) {  // maskz: the unmasked intrinsics trip GCC 12's warnings
      const __m512i wide = _mm512_maskz_cvtepu16_epi32(
          0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return (V)_mm512_maskz_slli_epi32(0xffff, wide, 16);
    }
#endif
#if defined(__AVX2__)
    if constexpr (L == 8) {
      return (V)_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    }
#endif
    typename HalfLanes<L>::Half h;
    __builtin_memcpy(&h, p, sizeof(h));
    return __builtin_bit_cast(V, __builtin_convertvector(h, typename HalfLanes<L>::Wide) << 16);
  } else if constexpr (Stored == Elem::I8) {  // sign-extended, then converted (exact)
    // Intrinsics: GCC turns __builtin_convertvector from int8 into one lane at a time.
#if defined(__AVX512F__)
    if constexpr (L == 16) {  // maskz: the unmasked intrinsics trip GCC 12's warnings
      return (V)_mm512_maskz_cvtepi32_ps(
          0xffff,
          _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
#endif
#if defined(__AVX2__)
    if constexpr (L == 8) {
      return (V)_mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
#endif
    V v;
    for (int i = 0; i < L; ++i) v[i] = T(p[i]);
    return v;
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

// Whether [p, p + bytes) lies in one 4 KiB page. AVX2's vmaskmov is used only then: AMD
// leaves faults on its masked-off elements to the implementation (Intel suppresses them; so
// do AVX-512's masked loads and stores on both).
inline bool in_one_page(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & 4095) + bytes <= 4096;
}

// load_partial through a zeroed buffer: any ISA.
template <Elem Stored, typename T, typename E>
inline typename Simd<T>::V load_partial_copied(const E* p, int n) {
  E buf[Simd<T>::kLanes] = {};
  for (int i = 0; i < n; ++i) buf[i] = p[i];
  return load_elements<Stored, T>(buf);
}

// The first n (0 < n < kLanes) elements from p as one vector, its other lanes 0: a row's last
// D % kLanes elements. Reads nothing past p + n (the row may end its array): masked loads
// where the ISA has them, else through a zeroed buffer. One vector instead of n scalar
// conversions per row: float16 decode at D = 40 spent more time on its last 8 columns than on
// the other 32 (2.6x the float32 cache's time before).
template <Elem Stored, typename T, typename E>
inline typename Simd<T>::V load_partial(const E* p, int n) {
  using V [[maybe_unused]] = typename Simd<T>::V;  // unused where the ISA has no masked loads
  [[maybe_unused]] constexpr int L = Simd<T>::kLanes;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (L == 16 && sizeof(T) == 4) {  // maskz: the unmasked intrinsics trip GCC 12
    const __mmask16 m = __mmask16((1u << n) - 1);
    if constexpr (Stored == Elem::Compute) {
      return (V)_mm512_maskz_loadu_ps(m, p);
    } else if constexpr (Stored == Elem::I8) {
      return (V)_mm512_maskz_cvtepi32_ps(
          0xffff, _mm512_maskz_cvtepi8_epi32(0xffff, _mm_maskz_loadu_epi8(m, p)));
    } else if constexpr (Stored == Elem::Bf16) {
      const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(m, p));
      return (V)_mm512_maskz_slli_epi32(0xffff, wide, 16);
    } else {
      return (V)_mm512_maskz_cvtph_ps(0xffff, _mm256_maskz_loadu_epi16(m, p));
    }
  }
  if constexpr (L == 8 && sizeof(T) == 8 && Stored == Elem::Compute) {
    return (V)_mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p);
  }
#endif
#if defined(__AVX2__)
  if constexpr (L == 8 && sizeof(T) == 4 && Stored == Elem::Compute) {
    if (in_one_page(p, sizeof(V))) {
      return (V)_mm256_maskload_ps(
          p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    }
  }
  if constexpr (L == 4 && sizeof(T) == 8 && Stored == Elem::Compute) {
    if (in_one_page(p, sizeof(V))) {
      return (V)_mm256_maskload_pd(
          p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)));
    }
  }
#endif
  return load_partial_copied<Stored, T>(p, n);
}

// The first n (0 < n < kLanes) lanes of v to p; nothing past p + n is written.
template <typename T>
inline void store_partial(T* p, typename Simd<T>::V v, int n) {
  [[maybe_unused]] constexpr int L = Simd<T>::kLanes;  // unused without masked stores
#if defined(__AVX512F__)
  if constexpr (L == 16 && sizeof(T) == 4) {
    _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), (__m512)v);
    return;
  }
  if constexpr (L == 8 && sizeof(T) == 8) {
    _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), (__m512d)v);
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (L == 8 && sizeof(T) == 4) {
    if (in_one_page(p, sizeof(v))) {
      _mm256_maskstore_ps(
          p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
          (__m256)v);
      return;
    }
  }
  if constexpr (L == 4 && sizeof(T) == 8) {
    if (in_one_page(p, sizeof(v))) {
      _mm256_maskstore_pd(
          p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)), (__m256d)v);
      return;
    }
  }
#endif
  for (int i = 0; i < n; ++i) p[i] = v[i];
}

// An operand's elements as type E.
template <typename E, typename Operand>
inline const E* elements(const Operand& x) {
  return static_cast<const E*>(x.data);
}

// Row j of a Rows operand whose elements start at `base`: from its row table where it has one
// (a tile of a paged cache, in several blocks), else j * ld elements on.
template <typename E, typename Operand>
inline const E* row_of(const Operand& x, const E* base, int64_t j) {
  return x.rows ? reinterpret_cast<const E*>(x.rows[j] + x.row_offset) : base + j * x.ld;
}
// Row j of a Rows operand in the tile the thread reads next (TileStep::prefetch_next).
template <typename Operand>
inline const char* next_row(const Operand& x, int64_t j) {
  return x.next[j] + x.next_offset;
}

// The K and V rows a step reads (key.form Rows, value.form Rows): the compute type, half or
// int8.
template <Elem Stored, typename T>
inline auto key_rows(const cpuattn::TileStep<T>& a) {
  if constexpr (Stored == Elem::Compute) {
    return elements<T>(a.key);
  } else if constexpr (Stored == Elem::I8) {
    return elements<int8_t>(a.key);
  } else {
    return elements<uint16_t>(a.key);
  }
}
template <Elem Stored, typename T>
inline auto value_rows(const cpuattn::TileStep<T>& a) {
  if constexpr (Stored == Elem::Compute) {
    return elements<T>(a.value);
  } else if constexpr (Stored == Elem::I8) {
    return elements<int8_t>(a.value);
  } else {
    return elements<uint16_t>(a.value);
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
