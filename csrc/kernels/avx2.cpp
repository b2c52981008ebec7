// The portable tile step compiled for the avx2 target (flags set in CMakeLists.txt).
#include <immintrin.h>  // before the namespace below: F16C conversions

#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 32

namespace {
#include "kernels/tile_step.inl"
}  // namespace

namespace cpuattn {
extern const KernelSet kAvx2Kernels = portable_kernels("avx2");
}  // namespace cpuattn
