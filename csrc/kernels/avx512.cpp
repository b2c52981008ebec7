// The portable tile step compiled for the avx512 target (flags set in CMakeLists.txt).
#include <immintrin.h>  // before the namespace below: exp.h uses vscalefps

#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 64

namespace {
#include "kernels/tile_step.inl"
}  // namespace

namespace cpuattn {
extern const KernelSet kAvx512Kernels = portable_kernels("avx512");
}  // namespace cpuattn
