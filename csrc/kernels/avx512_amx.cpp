// The avx512_bf16 kernels plus AMX tiles for bfloat16 K/V (flags set in CMakeLists.txt):
// tile_step_amx where Dv allows it (the driver checks), the AVX-512 float32 conversion path
// otherwise (on AMX CPUs vdpbf16ps is slower than converting and using FMAs).
#include <immintrin.h>  // before the namespace below: exp.h uses vscalefps

#include "convert.h"
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 64

namespace {
#include "kernels/tile_step.inl"
#include "kernels/bf16_step.inl"
#include "kernels/amx_step.inl"
}  // namespace

namespace cpuattn {
extern const KernelSet kAvx512AmxKernels = {
    "avx512_amx",         &tile_step<float>,     &tile_step<double>, &pack_keys<float>,
    &pack_keys<double>,   &convert_f16_rows,     &convert_bf16_rows, &exp_array<float>,
    &exp_array<double>,   nullptr,               &tile_step_amx,     &configure_tiles,
    &release_tiles,       &pack_bf16_keys,       &pack_bf16_values};
}  // namespace cpuattn
