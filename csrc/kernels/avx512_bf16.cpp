// The avx512 kernels plus bfloat16 dot products (AVX512-BF16, flags set in CMakeLists.txt):
// the float32 and float64 steps are the avx512 ones compiled again; bfloat16 K/V use
// tile_step_bf16 instead of being converted to float32, and the backward on bfloat16 inputs
// multiplies bfloat16 pairs too (dpbf16_backward_step.inl).
#define CPUATTN_TARGET avx512_bf16  // this ISA's namespace (target.h): before any include
#include <immintrin.h>  // before the namespace below: exp.h uses vscalefps

#include "convert.h"
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 64

namespace cpuattn {
inline namespace CPUATTN_TARGET {
namespace {
#include "kernels/tile_step.inl"
#include "kernels/bf16_step.inl"
#include "kernels/bf16_backward_weights.inl"
#include "kernels/dpbf16_backward_step.inl"
constexpr KernelSet bf16_kernels() {
  KernelSet k = portable_kernels("avx512_bf16");
  k.step_bf16 = &tile_step_bf16;
  k.backward_bf16 = {&backward_weights_bf16<rows_times_keys_dp>, &accumulate_dq_dp,
                     &accumulate_key_gradient_dp, 2};
  k.pack_bf16_keys = &pack_bf16_keys;
  k.pack_bf16_values = &pack_bf16_values;
  return k;
}
}  // namespace
}  // namespace CPUATTN_TARGET

extern const KernelSet kAvx512Bf16Kernels = bf16_kernels();
}  // namespace cpuattn
