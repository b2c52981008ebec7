// The avx512_bf16 kernels plus AMX tiles for bfloat16 K/V (flags set in CMakeLists.txt):
// tile_step_amx where Dv allows it (the driver checks), the AVX-512 float32 conversion path
// otherwise (on AMX CPUs vdpbf16ps is slower than converting and using FMAs).
#define CPUATTN_TARGET avx512_amx  // this ISA's namespace (target.h): before any include
#include <immintrin.h>  // before the namespace below: exp.h uses vscalefps

#include "convert.h"
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 64

namespace cpuattn {
inline namespace CPUATTN_TARGET {
namespace {
#include "kernels/tile_step.inl"
#include "kernels/bf16_step.inl"
#include "kernels/amx_step.inl"
#include "kernels/bf16_backward_weights.inl"
#include "kernels/amx_backward_step.inl"
constexpr KernelSet amx_kernels() {
  KernelSet k = portable_kernels("avx512_amx");
  k.step_bf16_amx = &tile_step_amx;
  k.amx_begin = &configure_tiles;
  k.amx_end = &release_tiles;
  k.backward_bf16 = {&backward_weights_bf16<rows_times_keys>, &accumulate_dq,
                     &accumulate_key_gradient, 2 * cpuattn::kAmxPairs};
  k.pack_bf16_keys = &pack_bf16_keys;
  k.pack_bf16_values = &pack_bf16_values;
  return k;
}
}  // namespace
}  // namespace CPUATTN_TARGET

extern const KernelSet kAvx512AmxKernels = amx_kernels();
}  // namespace cpuattn
