// The portable tile step compiled for the avx512 target (flags set in CMakeLists.txt).
#define CPUATTN_TARGET avx512  // this ISA's namespace (target.h): before any include
#include <immintrin.h>  // before the namespace below: exp.h uses vscalefps

#include "convert.h"
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 64

namespace cpuattn {
inline namespace CPUATTN_TARGET {
namespace {
#include "kernels/tile_step.inl"
}  // namespace
}  // namespace CPUATTN_TARGET

extern const KernelSet kAvx512Kernels = portable_kernels("avx512");
}  // namespace cpuattn
