// The rest of a portable kernel set: K^T packing, half-to-float conversion, q scaling, row
// finishing, the exp test hook, and the set itself. Part of tile_step.inl (its namespaces and
// linkage rules).
#ifndef CPUATTN_VEC_BYTES
#error "included by kernels/tile_step.inl only"
#endif

// K rows [0, cols), ld elements apart, -> kt: d x kTileKeys (K transposed, so score columns
// are unit-stride), zero in columns [cols, zero_to). Blocks of 4 floats (2 doubles) are transposed
// in 16-byte registers: half the loads and stores of an element-by-element copy, which made decode
// (a fresh tile per few query rows) bound by this copy rather than by memory.
template <typename T>
void pack_keys(const T* k, int64_t ld, int64_t cols, int64_t d, T* kt, int64_t zero_to) {
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
    for (int64_t j = cols; j < zero_to; ++j) kt[e * W + j] = 0;
  }
}

// Half K or V rows -> float rows, dst[j * width + e] = src[j * ld + e]. Branch-free per element
// so the compiler vectorizes it for this ISA (the same values as convert.h's scalar helpers).
// The lines of row j of `ahead` (rows ld apart, `bytes` long), into the caches.
inline void prefetch_row(const void* ahead, int64_t ld, int64_t j, int64_t bytes) {
  if (!ahead) return;
  const char* row = static_cast<const char*>(ahead) + j * ld;
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
}

inline void convert_bf16_rows(const void* rows_in, int64_t ld, const float*, int64_t, int64_t rows,
                              int64_t width, float* dst, const void* ahead) {
  const auto* src = static_cast<const uint16_t*>(rows_in);
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_row(ahead, ld * 2, j, width * 2);
    const uint16_t* s = src + j * ld;
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + j * width);
    for (int64_t e = 0; e < width; ++e) d[e] = uint32_t(s[e]) << 16;
  }
}

// float16: F16C's vcvtph2ps where the ISA has it (8 or 16 a time), bit arithmetic otherwise.
inline void convert_f16_rows(const void* rows_in, int64_t ld, const float*, int64_t, int64_t rows,
                             int64_t width, float* dst, const void* ahead) {
  const auto* src = static_cast<const uint16_t*>(rows_in);
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_row(ahead, ld * 2, j, width * 2);
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

// int8 rows times their scales -> float rows (branch-free: the compiler vectorizes it, sign
// extension and conversion, for this ISA). One rounded float32 product per element, with
// nothing to fuse into an FMA: the same bits on every ISA, and as NumPy's dequantization.
inline void convert_i8_rows(const void* rows_in, int64_t ld, const float* scales, int64_t scale_ld,
                            int64_t rows, int64_t width, float* dst, const void* ahead) {
  const auto* src = static_cast<const int8_t*>(rows_in);
  for (int64_t j = 0; j < rows; ++j) {
    prefetch_row(ahead, ld, j, width);
    const int8_t* s = src + j * ld;
    const float scale = scales[j * scale_ld];
    float* d = dst + j * width;
    for (int64_t e = 0; e < width; ++e) d[e] = float(s[e]) * scale;
  }
}

// x * a rounded to bfloat16: convert.h's f32_to_bf16 without branches, so the compiler
// vectorizes it for this ISA (vcvtneps2bf16 would treat subnormals as zero).
inline void bf16_from_float(const float* x, float a, int64_t n, void* dst) {
  auto* y = static_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = f32_to_bits(x[i] * a);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    y[i] = uint16_t((b & 0x7fffffffu) > 0x7f800000u ? (b >> 16) | 0x40u : rounded);
  }
}

// x * a rounded to float16: F16C's vcvtps2ph (to nearest even) where the ISA has it, with NaN
// as convert.h's f32_to_f16 makes it (sign | 0x7e00, where vcvtps2ph keeps the payload's top
// bits); f32_to_f16 for the rest.
inline void f16_from_float(const float* x, float a, int64_t n, void* dst) {
  auto* y = static_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(a));
    // maskz: the unmasked intrinsic trips GCC 12's -Wmaybe-uninitialized
    const __m256i h =
        _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), h);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) {
      for (int k = 0; k < 16; ++k) y[i + k] = f32_to_f16(x[i + k] * a);
    }
  }
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(a));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), h);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0) {
      for (int k = 0; k < 8; ++k) y[i + k] = f32_to_f16(x[i + k] * a);
    }
  }
#endif
  for (; i < n; ++i) y[i] = f32_to_f16(x[i] * a);
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
  k.encodings[int(Elem::I8)].to_float = &convert_i8_rows;
  k.encodings[int(Elem::F16)].from_float = &f16_from_float;
  k.encodings[int(Elem::Bf16)].from_float = &bf16_from_float;
  k.scale_f32 = &scale_array<float>;
  k.scale_f64 = &scale_array<double>;
  k.finish_f32 = &finish_rows<float>;
  k.finish_f64 = &finish_rows<double>;
  k.exp_f32 = &exp_array<float>;
  k.exp_f64 = &exp_array<double>;
  k.backward_f32 = &backward_step<float>;
  k.backward_f64 = &backward_step<double>;
  return k;
}
