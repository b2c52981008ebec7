// The portable tile step compiled for the avx2 target (flags set in CMakeLists.txt).
#define CPUATTN_TARGET avx2  // this ISA's namespace (target.h): before any include
#include <immintrin.h>  // before the namespace below: F16C conversions

#include "convert.h"
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 32

namespace cpuattn {
inline namespace CPUATTN_TARGET {
namespace {
#include "kernels/tile_step.inl"
}  // namespace
}  // namespace CPUATTN_TARGET

extern const KernelSet kAvx2Kernels = portable_kernels("avx2");
}  // namespace cpuattn
