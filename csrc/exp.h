// Branch-free exp the compiler can vectorize (no libm call in the softmax loop).
// exp(x) = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite
// split of ln 2), e^r by its Taylor polynomial: degree 7 for float (truncation < 6e-9, under
// 1 ulp), degree 13 for double (< 4e-18). Inputs below the smallest normal result flush to 0,
// -inf gives 0, NaN stays NaN. Included inside each kernel's anonymous namespace.
#pragma once
#include <cstdint>

template <typename T>
struct ExpConsts;

template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  static constexpr float kMin = -87.33654f;  // log(FLT_MIN): smaller results flush to 0
  static constexpr float kMax = 88.0f;
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
  static constexpr double kMax = 709.0;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.6931471803691238;
  static constexpr double kLn2Lo = 1.9082149292705877e-10;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kBias = 1023;
};

// Lane-wise on a GCC/Clang vector V of T (a 1-lane vector for a scalar).
template <typename T, typename V>
inline V fast_exp_vec(V x) {
  using C = ExpConsts<T>;
  typedef typename C::Bits IV __attribute__((vector_size(sizeof(V))));
  const V lo = V{} + C::kMin, hi = V{} + C::kMax, shifter = V{} + C::kShifter;
  const V xc = x < lo ? lo : (x > hi ? hi : x);
  const V n = (xc * T(1.4426950408889634) + shifter) - shifter;
  const V r = (xc - n * C::kLn2Hi) - n * C::kLn2Lo;
  V p;
  if constexpr (sizeof(T) == 4) {
    p = V{} + T(1.0 / 5040);
    p = p * r + T(1.0 / 720);
    p = p * r + T(1.0 / 120);
    p = p * r + T(1.0 / 24);
    p = p * r + T(1.0 / 6);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  } else {
    p = V{} + T(1.0 / 6227020800.0);
    p = p * r + T(1.0 / 479001600.0);
    p = p * r + T(1.0 / 39916800.0);
    p = p * r + T(1.0 / 3628800.0);
    p = p * r + T(1.0 / 362880.0);
    p = p * r + T(1.0 / 40320.0);
    p = p * r + T(1.0 / 5040.0);
    p = p * r + T(1.0 / 720.0);
    p = p * r + T(1.0 / 120.0);
    p = p * r + T(1.0 / 24.0);
    p = p * r + T(1.0 / 6.0);
    p = p * r + T(0.5);
    p = p * r + T(1);
    p = p * r + T(1);
  }
  const IV bits = (__builtin_convertvector(n, IV) + C::kBias) << C::kMantissaBits;
  const V y = p * __builtin_bit_cast(V, bits);
  // x != x keeps NaN; below kMin the true result is subnormal or 0: flush.
  return x < lo ? V{} : (x != x ? x : y);
}

template <typename T>
inline T fast_exp(T x) {
  typedef T V1 __attribute__((vector_size(sizeof(T))));
  const V1 v = {x};
  return fast_exp_vec<T>(v)[0];
}
