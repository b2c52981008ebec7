// Plain types shared by the driver and the kernels: enums and aggregates, no functions, so
// the kernel translation units may include this header (see target.h).
#pragma once
#include <cstdint>

namespace cpuattn {

// I8: symmetric int8 K and V with one float32 scale per row (key, kv head), computed in F32.
enum class DType { F32, F64, F16, BF16, I8 };
enum class MaskKind { None, Bool, Additive };
// Which end the causal diagonal (and a window) is anchored to; see DESIGN §1.
enum class Align { BottomRight = 0, TopLeft = 1 };

// The keys a query row may see (mask.h): a half-open range, empty when hi <= lo.
struct KeyRange {
  int64_t lo, hi;
};

}  // namespace cpuattn
