// float16 / bfloat16 <-> float conversions (IEEE round-to-nearest-even, NaN kept, subnormals
// exact), portable C++: no F16C or AVX512-BF16 needed. Used where half inputs are read
// (packing q, K and V tiles) and where half outputs are written. Included by the driver and by
// kernels: defined in the includer's target namespace, with internal linkage (target.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "target.h"
#include "types.h"

namespace cpuattn {
inline namespace CPUATTN_TARGET {
namespace {

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);  // quiet NaN
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float f = float(m) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  if (e == 31) return bits_to_f32(sign | 0x7f800000u | (m << 13));  // inf, NaN
  return bits_to_f32(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00;          // NaN
  if (x >= 0x477ff000u) return sign | 0x7c00;         // >= 65520 rounds to inf
  if (x < 0x38800000u) {                              // below 2^-14: subnormal or zero
    const float scaled = bits_to_f32(x) * 16777216.0f;  // * 2^24, exact
    return sign | uint16_t(std::nearbyint(scaled));   // 1024 is the smallest normal: right
  }
  x += 0x0fffu + ((x >> 13) & 1u);  // round the mantissa to 10 bits, ties to even
  return sign | uint16_t((x - (uint32_t(127 - 15) << 23)) >> 13);
}

// Element i of a buffer holding dtype t (the compute type T itself, or a half type), as T.
template <typename T>
inline T load_as(const void* base, DType t, int64_t i) {
  if (t == DType::F16) return T(f16_to_f32(static_cast<const uint16_t*>(base)[i]));
  if (t == DType::BF16) return T(bf16_to_f32(static_cast<const uint16_t*>(base)[i]));
  return static_cast<const T*>(base)[i];
}

template <typename T>
inline void store_as(void* base, DType t, int64_t i, T x) {
  if (t == DType::F16) {
    static_cast<uint16_t*>(base)[i] = f32_to_f16(float(x));
  } else if (t == DType::BF16) {
    static_cast<uint16_t*>(base)[i] = f32_to_bf16(float(x));
  } else {
    static_cast<T*>(base)[i] = x;
  }
}

}  // namespace
}  // namespace CPUATTN_TARGET
}  // namespace cpuattn
