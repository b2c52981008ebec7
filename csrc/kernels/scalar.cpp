// The portable tile step compiled for the scalar target (flags set in CMakeLists.txt).
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 16

namespace {
#include "kernels/tile_step.inl"
}  // namespace

namespace cpuattn {
extern const KernelSet kScalarKernels = portable_kernels("scalar");
}  // namespace cpuattn
