// The portable tile step compiled for the scalar target (flags set in CMakeLists.txt).
#define CPUATTN_TARGET scalar  // this ISA's namespace (target.h): before any include
#if defined(__x86_64__) || defined(_M_X64)
// Before the namespace below: with CPUATTN_NATIVE this target gets -march=native, and the
// kernels then use the F16C / AVX-512 intrinsics their macros allow.
#include <immintrin.h>
#endif
#include "convert.h"
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 16

namespace cpuattn {
inline namespace CPUATTN_TARGET {
namespace {
#include "kernels/tile_step.inl"
}  // namespace
}  // namespace CPUATTN_TARGET

extern const KernelSet kScalarKernels = portable_kernels("scalar");
}  // namespace cpuattn
