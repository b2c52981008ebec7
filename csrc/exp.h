// Branch-free exp the compiler can vectorize (no libm call in the softmax loop).
// exp(x) = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite
// split of ln 2), e^r by a polynomial: minimax degree 6 for float, Taylor degree 16 for double.
// Inputs below the smallest normal result flush to 0, -inf gives 0, past the largest finite
// result inf, NaN stays NaN. Max error, measured (tests/test_exp.py): 1.3 ulp (float),
// 0.8 ulp (double). Included by tile_step.inl, inside the kernel's target namespace and an
// anonymous one (target.h): each ISA has its own copy, local to its object file.
#pragma once
#include <cstdint>

// AVX-512 computes p * 2^n in one instruction (vscalefps/pd), for any n: the includer of an
// AVX-512 translation unit includes <immintrin.h> first (this file sits inside a namespace).
#if defined(__AVX512F__)
constexpr bool kHaveScalef = true;
typedef float F32x16 __attribute__((vector_size(64)));
typedef double F64x8 __attribute__((vector_size(64)));
// The masked forms: GCC 12's unmasked ones warn (-Wmaybe-uninitialized on their undefined src).
inline F32x16 scalef(F32x16 p, F32x16 n) {
  return (F32x16)_mm512_mask_scalef_ps((__m512)p, __mmask16(0xFFFF), (__m512)p, (__m512)n);
}
inline F64x8 scalef(F64x8 p, F64x8 n) {
  return (F64x8)_mm512_mask_scalef_pd((__m512d)p, __mmask8(0xFF), (__m512d)p, (__m512d)n);
}
// 1 / x to float precision: 14-bit estimate + one Newton step (vdivps costs ~4x more).
inline F32x16 reciprocal(F32x16 x) {
  const F32x16 r = (F32x16)_mm512_mask_rcp14_ps((__m512)x, __mmask16(0xFFFF), (__m512)x);
  return r * (2.0f - x * r);
}
#else
constexpr bool kHaveScalef = false;
template <typename V>
V scalef(V p, V n);  // never instantiated without AVX-512
#endif

template <typename T>
struct ExpConsts;

template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  // log(FLT_MIN) rounded to float, as the NumPy backend has it: smaller inputs flush to 0.
  static constexpr float kMin = -87.3365478515625f;
  static constexpr float kMax = 88.8f;  // past log(FLT_MAX) = 88.72: the result is inf
  static constexpr float kMinNormalResult = -86.0f;  // n >= -124: 2^n * p stays normal
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding rounds to an integer
  static constexpr float kLn2Hi = 0.693145751953125f;
  static constexpr float kLn2Lo = 1.428606765330187e-06f;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kBias = 127;
};

template <>
struct ExpConsts<double> {
  using Bits = int64_t;
  static constexpr double kMin = -708.3964185322641;  // log(DBL_MIN)
  static constexpr double kMax = 709.9;  // past log(DBL_MAX) = 709.78: inf
  static constexpr double kMinNormalResult = -708.0;  // n >= -1021: 2^n * p stays normal
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.6931471803691238;
  static constexpr double kLn2Lo = 1.9082149292705877e-10;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kBias = 1023;
};

// p * 2^n for integer-valued n in [-kBias + 1, kBias] (any n with AVX-512's vscalef).
template <typename T, typename V>
inline V times_two_to(V p, V n) {
  using C = ExpConsts<T>;
  if constexpr (kHaveScalef && sizeof(V) == 64) {
    return scalef(p, n);
  } else {
    typedef typename C::Bits IV __attribute__((vector_size(sizeof(V))));
    const IV bits = (__builtin_convertvector(n, IV) + C::kBias) << C::kMantissaBits;
    return p * __builtin_bit_cast(V, bits);
  }
}

// c[0] + r * (c[1] + r * (... + r * c[N-1])): one multiply-add per coefficient.
template <typename T, typename V, int N>
inline V horner(V r, const T (&c)[N]) {
  V p = V{} + c[N - 1];
  for (int i = N - 1; i-- > 0;) p = p * r + c[i];
  return p;
}

// n = round(x / ln 2), by adding and subtracting 1.5 * 2^mantissa bits.
template <typename T, typename V>
inline V nearest_power_of_two(V x) {
  const V shifter = V{} + ExpConsts<T>::kShifter;
  return (x * T(1.4426950408889634) + shifter) - shifter;
}

// exp(xc) for xc in [kMin, kMax], or NaN (-> NaN): the arithmetic of fast_exp_vec without
// its range handling, for callers that bound the argument themselves (tanh).
template <typename T, typename V>
inline V exp_in_range(V xc) {
  using C = ExpConsts<T>;
  V n = nearest_power_of_two<T>(xc);
  if constexpr (!(kHaveScalef && sizeof(V) == 64)) {
    // 2^n through the exponent bits holds n <= kBias only: near overflow, r grows up to ln 2
    // instead (still accurate), and a true overflow overflows in the final product.
    const V top = V{} + T(C::kBias);
    n = n < top ? n : top;
  }
  const V r = (xc - n * C::kLn2Hi) - n * C::kLn2Lo;
  if constexpr (sizeof(T) == 4) {
    // Minimax for relative error on [-ln2/2, ln2] (r reaches ln 2 near overflow without
    // AVX-512), fitted here: 3.2e-8, under float rounding (max error: tests/test_exp.py).
    static constexpr T kPoly[] = {1,
                                  0.9999998211860657,
                                  0.5000030398368835,
                                  0.16667303442955017,
                                  0.041615236550569534,
                                  0.008317459374666214,
                                  0.0016380349406972528};
    return times_two_to<T>(horner(r, kPoly), n);
  } else {
    // Taylor, degree 17: < 1e-17 up to r = ln 2.
    static constexpr T kPoly[] = {1,
                                  1,
                                  1.0 / 2,
                                  1.0 / 6,
                                  1.0 / 24,
                                  1.0 / 120,
                                  1.0 / 720,
                                  1.0 / 5040,
                                  1.0 / 40320,
                                  1.0 / 362880,
                                  1.0 / 3628800,
                                  1.0 / 39916800,
                                  1.0 / 479001600,
                                  1.0 / 6227020800.0,
                                  1.0 / 87178291200.0,
                                  1.0 / 1307674368000.0,
                                  1.0 / 20922789888000.0,
                                  1.0 / 355687428096000.0};
    return times_two_to<T>(horner(r, kPoly), n);
  }
}

// Lane-wise on a GCC/Clang vector V of T (a 1-lane vector for a scalar).
template <typename T, typename V>
inline V fast_exp_vec(V x) {
  using C = ExpConsts<T>;
  const V lo = V{} + C::kMin, hi = V{} + C::kMax;
  // Inputs below kMin (and NaN) are computed as 0 and replaced below: clamping them to kMin
  // instead would make 2^n * p a subnormal, and a subnormal result costs a microcode assist
  // (~100 cycles) per vector on x86, on every masked or underflowing score.
  V xc = x >= lo ? x : V{};
  xc = xc < hi ? xc : hi;
  const V y = exp_in_range<T>(xc);
  // x != x keeps NaN; below kMin the true result is subnormal or 0: flush.
  return x < lo ? V{} : (x != x ? x : y);
}

// e^r for r = xc - n ln 2 (n = nearest_power_of_two(xc)): exp_lean's polynomial part.
template <typename T, typename V>
inline V exp_lean_fraction(V xc, V n) {
  const V r = xc - n * T(0.693147180559945);
  static constexpr T kPoly[] = {1,
                                0.9999997019767761,
                                0.4999915063381195,
                                0.1666763573884964,
                                0.04189793020486832,
                                0.008290315046906471};
  return horner(r, kPoly);
}

// exp(xc) for xc in [-88, 88] or NaN, lean in float: one-constant ln 2 reduction (error
// |n| * 1.9e-9 in r, so 2.4e-7 relative at the ends of the range, less near 0) and a degree-5
// minimax for e^r on [-ln2/2, ln2/2] (2.2e-7 relative, fitted here). 4 operations fewer than
// exp_in_range and ~3 ulp: for the softmax weights and tanh, not for the exp test hook.
// double: exp_in_range.
template <typename T, typename V>
inline V exp_lean(V xc) {
  if constexpr (sizeof(T) == 4) {
    const V n = nearest_power_of_two<T>(xc);
    return times_two_to<T>(exp_lean_fraction<T>(xc, n), n);
  } else {
    return exp_in_range<T>(xc);
  }
}

// exp(x) for the softmax's x = s - max: x <= 0, -inf or NaN, so no overflow side; results
// under exp(kMinNormalResult) (~4e-38 in float, ~3e-308 in double, just above the smallest
// normal) flush to 0 rather than be clamped there, which kept every 2^n * p normal (a
// subnormal costs a microcode assist on x86). 3 range operations instead of fast_exp_vec's 7.
template <typename T, typename V>
inline V fast_exp_nonpositive(V x) {
  const V lo = V{} + ExpConsts<T>::kMinNormalResult;
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4 && sizeof(V) == 64) {
    // One compare and a zero-masked vscalefps instead of a clamp and a select: lanes below lo
    // (-inf included) compute garbage that is never written; "not less than" holds for NaN,
    // which stays NaN. Kept lanes get the same bits as below.
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, (__m512)lo, _CMP_NLT_UQ);
    const V n = nearest_power_of_two<T>(x);
    return (V)_mm512_maskz_scalef_ps(keep, (__m512)exp_lean_fraction<T>(x, n), (__m512)n);
  }
#endif
  const V xc = lo > x ? lo : x;  // NaN stays NaN
  return x < lo ? V{} : exp_lean<T>(xc);
}

template <typename T>
inline T fast_exp(T x) {
  typedef T V1 __attribute__((vector_size(sizeof(T))));
  const V1 v = {x};
  return fast_exp_vec<T>(v)[0];
}
