// Tile sizes, in one place. Chosen for L1/L2 of current x86 cores (32-48 KiB L1d, >= 1 MiB L2):
// a 64-key tile of packed K (D x 64) plus a 64 x 64 score tile stay in L1/L2 for D <= 128.
#pragma once
#include <cstdint>

namespace cpuattn {

// Query rows per tile. Rows are (query position, head-in-GQA-group) pairs, so one K/V tile
// serves every query head that shares it.
constexpr int64_t kTileRows = 64;
// Keys per tile.
constexpr int64_t kTileKeys = 64;

}  // namespace cpuattn
