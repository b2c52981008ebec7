// The micro-kernel interface: one (query tile x key tile) step of online-softmax attention.
// Every ISA implements the same step; the driver owns packing, tiling and finalization.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <utility>  // std::integer_sequence, for lane shuffles in the kernels
#include <vector>

#include "attention.h"
#include "mask.h"
#include "tiles.h"

namespace cpuattn {

template <typename T>
struct TileStep {
  const T* q;       // rows x d, packed row-major, already multiplied by the scale
  const T* kt;      // d x kTileKeys, packed K transposed; columns >= cols are zero
  const T* v;       // V row of the tile's first key; rows are v_ld elements apart
  int64_t v_ld;
  int64_t rows, cols, d, dv;
  T* s;             // scratch, rows x kTileKeys
  T* o;             // running unnormalized output, rows x dv
  T* m;             // running row max (-inf before any key)
  T* l;             // running row sum of exp(s - m), as kSumSlots partial sums per row

  int64_t j0;                  // index of the tile's first key
  T softcap;                   // > 0: s -> softcap * tanh(s / softcap), before the mask
  const T* slopes;             // per row ALiBi slope, or nullptr: s -= slope * |diag - j|
  const int64_t* diag;         // per row: i + off, the key on the row's diagonal
  const T* additive_w;         // (d,): Bahdanau scores sum_e w[e] tanh(q[e] + k[e]), or nullptr
  const KeyRange* bounds;      // per row, used only when apply_bounds
  bool apply_bounds;           // false for Full tiles: no per-element checks
  MaskKind mask_kind;
  const void* const* mask_rows;  // per row: the mask element of key 0
  int64_t mask_col_stride;       // elements between consecutive keys (0 when broadcast)
};

struct KernelSet {
  const char* name;
  void (*step_f32)(const TileStep<float>&);
  void (*step_f64)(const TileStep<double>&);
  // K rows [0, cols), ld elements apart, -> d x kTileKeys transposed tile, zero past cols.
  void (*pack_f32)(const float* k, int64_t ld, int64_t cols, int64_t d, float* kt);
  void (*pack_f64)(const double* k, int64_t ld, int64_t cols, int64_t d, double* kt);
  // float16 / bfloat16 rows (ld elements apart) -> rows x width floats, contiguous.
  void (*convert_f16)(const uint16_t* src, int64_t ld, int64_t rows, int64_t width, float* dst);
  void (*convert_bf16)(const uint16_t* src, int64_t ld, int64_t rows, int64_t width, float* dst);
  // y[i] = the kernel's exp(x[i]): exposed so tests can hold it to np.exp.
  void (*exp_f32)(const float* x, float* y, int64_t n);
  void (*exp_f64)(const double* x, double* y, int64_t n);
};

// Kernels compiled into this build, best last. Only those the CPU supports are ever called.
extern const KernelSet kScalarKernels;
#if CPUATTN_HAVE_X86_KERNELS
extern const KernelSet kAvx2Kernels;
extern const KernelSet kAvx512Kernels;
#endif

// Run-time dispatch (kernels/dispatch.cpp). The default is the best ISA this CPU supports,
// or the one named by the CPUATTN_ISA environment variable.
const KernelSet& active_kernels();
std::vector<std::string> supported_isas();
// Forces one ISA; throws std::invalid_argument if unknown or unsupported on this CPU.
void select_isa(const std::string& name);
// The kernels of one ISA, without selecting them; throws as select_isa does.
const KernelSet& kernels_named(const std::string& name);

}  // namespace cpuattn
