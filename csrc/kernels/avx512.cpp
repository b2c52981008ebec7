// The portable tile step compiled for the avx512 target (flags set in CMakeLists.txt).
#include "kernels/kernel.h"

#define CPUATTN_VEC_BYTES 64

namespace {
#include "kernels/tile_step.inl"
}  // namespace

namespace cpuattn {
extern const KernelSet kAvx512Kernels = {"avx512", &tile_step<float>, &tile_step<double>};
}  // namespace cpuattn
