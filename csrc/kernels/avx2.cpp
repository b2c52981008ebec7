// The portable tile step compiled for the avx2 target (flags set in CMakeLists.txt).
#include <immintrin.h>  // before the namespace below: F16C conversions

#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 32

namespace {
#include "kernels/tile_step.inl"
}  // namespace

namespace cpuattn {
extern const KernelSet kAvx2Kernels = {"avx2", &tile_step<float>, &tile_step<double>,
                                             &pack_keys<float>, &pack_keys<double>,
                                             &convert_f16_rows, &convert_bf16_rows,
                                             &exp_array<float>, &exp_array<double>,
                                             nullptr, nullptr, nullptr, nullptr,
                                             nullptr, nullptr};
}  // namespace cpuattn
