// The micro-kernel interface: one (query tile x key tile) step of online-softmax attention.
// Every ISA implements the same step; the driver owns packing, tiling and finalization.
// Included by the kernel translation units, under their ISA's flags: types and declarations
// only, no function bodies (see target.h).
#pragma once
#include <cstdint>
#include <cstring>  // std::memcpy, for loads of two bfloat16 as one word
#include <limits>
#include <string>
#include <type_traits>
#include <utility>  // std::integer_sequence, for lane shuffles in the kernels
#include <vector>

#include "tiles.h"
#include "types.h"

namespace cpuattn {

// Cache lines to prefetch: `lines` lines from line `first` on, of `row_lines` lines a row, rows
// `stride` bytes apart from `at` (line-aligned). A contiguous range is one row.
struct PrefetchRange {
  const char* at;
  int64_t row_lines, stride, first, lines;
};

// How the elements of K or V rows are stored: the compute type, or (float32 compute) float16 /
// bfloat16 / int8 times a per-row scale (the operand's scales), which the float32 step reads
// in place as Rows and widens as it loads them, or a source stages (converts) with its
// KernelSet::encodings entry.
enum class Elem : uint8_t { Compute, F16, Bf16, I8 };
constexpr int kElems = 4;

// The key tile as a step reads it. A staged tile (packed, converted, pairs) is staged once
// for every query tile of its head, as wide as the head's valid keys allow: columns at or past
// the step's `cols` may hold later keys (even inf or NaN), and every score path masks them.
enum class KeyForm : uint8_t {
  PackedT,     // K^T in the compute type: d x kTileKeys, zero from the staged keys up to
               // padded_keys (pack_*); stale past that, where no forward step reads
  Rows,        // the tile's K rows in place, `ld` elements apart (or through the `rows`
               // table, for a paged tile in several blocks), stored as `elem`
  Bf16PairsT,  // bfloat16 pairs along D of K^T: d_pairs x kTileKeys, zero past d
};
struct KeyOperand {
  KeyForm form = KeyForm::PackedT;
  Elem elem = Elem::Compute;
  const void* data = nullptr;
  int64_t ld = 0;  // Rows: elements between consecutive keys' rows
  // I8 Rows: key j's row times scales[j * scale_ld] (the step scales its score)
  const float* scales = nullptr;
  int64_t scale_ld = 0;
  // Rows: key j's row at rows[j] + row_offset where the rows are not one run `ld` apart (a
  // tile of a paged cache, in several blocks), else rows is nullptr. The table is shared by
  // the kv heads of a sequence (kv_source.h), each head adding its own byte offset.
  const char* const* rows = nullptr;
  int64_t row_offset = 0;
  // Rows, with TileStep::prefetch_next: key j's row at next[j] + next_offset in the tile this
  // thread reads next (KeyTile::next: the item's next tile, or the next lockstep head's)
  const char* const* next = nullptr;
  int64_t next_offset = 0;
};

// The value tile as a step reads it.
enum class ValueForm : uint8_t {
  Rows,       // V rows, `ld` elements apart (or through the `rows` table), stored as `elem`
              // (in place, or a converted tile)
  Bf16Pairs,  // rows of `ld` pairs: consecutive keys' V (staged keys + 1) / 2, zero past dv
};
struct ValueOperand {
  ValueForm form = ValueForm::Rows;
  Elem elem = Elem::Compute;
  const void* data = nullptr;
  int64_t ld = 0;  // elements (Rows) or pairs (Bf16Pairs) between rows
  // The first staged key whose V row holds an inf or NaN (kTileKeys: none), where the source
  // knows it (bfloat16 pairs: found while packing, so the step need not scan); -1: unknown,
  // the step scans when it must. A step compares it with the keys it reads.
  int32_t first_nonfinite_key = -1;
  // I8 Rows: key j's row times scales[j * scale_ld] (the step scales its weight)
  const float* scales = nullptr;
  int64_t scale_ld = 0;
  // Rows: as KeyOperand's
  const char* const* rows = nullptr;
  int64_t row_offset = 0;
  const char* const* next = nullptr;
  int64_t next_offset = 0;
};

// One step: `rows` staged query rows against one key tile of `cols` keys.
template <typename T>
struct TileStep {
  const T* q;       // rows x d, q_ld apart: a packed copy times the scale, or (q_unscaled)
                    // the caller's rows or a copy as they are, for score_rows only
  int64_t q_ld;
  bool q_unscaled;  // q not scaled: score_rows multiplies the scores by dot_scale
  KeyOperand key;
  ValueOperand value;
  int64_t rows, cols, d, dv;
  T* s;             // scratch, rows x kTileKeys
  T* o;             // running unnormalized output, rows x dv
  T* m;             // running row max (-inf before any key)
  T* l;             // running row sum of exp(s - m), as kSumSlots partial sums per row

  int64_t j0;                  // index of the tile's first key
  bool prefetch_next;          // key.next and value.next name the rows this thread reads next
  T softcap;                   // > 0: s -> softcap * tanh(s / softcap), before the mask
  const T* slopes;             // per row ALiBi slope, or nullptr: s -= slope * |diag - j|
  const int64_t* diag;         // per row: i + off, the key on the row's diagonal
  const T* additive_w;         // (d,): Bahdanau scores sum_e w[e] tanh(q[e] + k[e]), or nullptr
  const KeyRange* bounds;      // per row, used only when apply_bounds
  bool apply_bounds;           // false for Full tiles: no per-element checks
  // Partial tiles with global tokens: bit c set when key j0 + c is global, kept by a row
  // outside its bounds when below the row's cap (caps, per row); 0: none in the tile.
  uint64_t global_cols;
  const int64_t* caps;
  MaskKind mask_kind;
  const void* const* mask_rows;  // per row: the mask element of key 0
  int64_t mask_col_stride;       // elements between consecutive keys (0 when broadcast)

  // The bfloat16 steps (KernelSet::step_bf16, step_bf16_amx) read q as these instead of q:
  // bfloat16 pairs in uint32 (low half the even element), scores times dot_scale.
  const uint32_t* q_hi;  // rows x d_pairs, q (unscaled) rounded to bfloat16
  const uint32_t* q_lo;  // rows x d_pairs, q - q_hi rounded, for a float32 q; else nullptr
  int64_t d_pairs;       // D's bfloat16 pairs, padded as the step needs
  T dot_scale;           // scores times this where q is unscaled (bfloat16 steps, q_unscaled)
  bool split_p;          // P.V with p as p_hi + p_lo (float32 output) rather than p rounded

  // This thread's next task (its q, K, V and out), to ask the caches for during this step, a
  // few lines per row block so the requests overlap the arithmetic (all of them at the task's
  // start bought nothing, measured). lines 0: none. The bfloat16 steps ignore them.
  PrefetchRange prefetch[kPrefetchRanges];
};

// A pair's operands as bfloat16 for the bfloat16 products (Bf16BackwardKernels::weights): the
// inputs were bfloat16, so these hold them exactly. Query-side tiles have kTileRows rows (zero past
// the step's rows), key-side ones kTileKeys keys (zero past its cols); d and dv are multiples
// of 32. A pair is two consecutive bfloat16 in a uint32, the first in the low half.
struct Bf16BackwardOperands {
  const uint16_t* q;     // kTileRows x d, q unscaled
  const uint16_t* dout;  // kTileRows x dv
  const uint32_t* kt;    // d / 2 x kTileKeys: K^T, pairs along D
  const uint32_t* vt;    // dv / 2 x kTileKeys: V^T, pairs along Dv
};

// One (query tile x key tile) pair of FlashAttention-2's backward (backward.cpp), in the
// compute type. The step recomputes the weights P = exp(S - lse) from `scores` (the
// forward's fields: q staged times the scale or in place, key PackedT, s scratch, rows, cols,
// j0 and the epilogue's softcap, ALiBi, mask and bounds), then dP = dO V^T, dS = P (dP -
// delta) (times softcap's derivative), and adds dV += P^T dO, dK += dS^T q, dQ += dS K (the
// driver applies the scale to dQ, and to dK where q is read in place, once at the end).
// Where P is 0 the pair exchanges nothing, even if dP or an operand row is inf or NaN.
template <typename T>
struct BackwardStep {
  TileStep<T> scores;
  const T* dout;      // rows x dv, dout_ld elements apart
  int64_t dout_ld;
  const T* vt;        // V^T packed: dv x kTileKeys, zero past cols
  const T* k;         // K rows [0, cols), k_ld elements apart
  int64_t k_ld;
  const T* lse;       // per row; +inf for a row that kept no key (its weights are all 0)
  const T* delta;     // per row: rowsum(dout * out)
  T* dp;              // scratch, rows x kTileKeys: dP, then dS
  T* cap_grad;        // scratch, rows x kTileKeys (softcap only)
  T* dq;              // rows x d accumulators
  T* dk;              // cols x d accumulators
  T* dv;              // cols x dv accumulators
  bool rows_nonfinite;  // some staged q or dout element is inf or NaN
  bool keys_nonfinite;  // some K element of the tile is inf or NaN
  // Bf16BackwardKernels::weights: S and dP from these (q unscaled: scores times dot_scale);
  // nullptr for backward_f32.
  const Bf16BackwardOperands* bf16_operands;
};

// The most tiles (n) a Bf16BackwardKernels::dq or key_gradient call sums over.
constexpr int kBf16BackwardMaxTiles = 8;

// The backward's five products as bfloat16 pairs with float32 sums (AMX tiles or AVX512-BF16's
// vdpbf16ps; backward.cpp sequences the parts): bfloat16 inputs, d and dv multiples of
// dim_multiple, every q, dout and K element of a pair finite. Called between KernelSet::amx_begin
// and amx_end where those are set.
struct Bf16BackwardKernels {
  // A pair's weights and their gradient, from b.bf16_operands: P into p and dS into ds as bfloat16
  // pairs of query rows (kTileRows / 2 x kTileKeys pairs: rows 2i and 2i + 1 in the low and high
  // halves of row i), dS also into ds_rows as bfloat16 rows (kTileRows x kTileKeys); zero
  // past b's rows (to a whole 32 rows for the pairs, 16 for ds_rows).
  void (*weights)(const BackwardStep<float>& b, uint32_t* p, uint32_t* ds, uint16_t* ds_rows);
  // dq[rows x d] (d apart) += the sum over n key tiles of ds_rows[i] . K_i, with K_i as pairs
  // of keys in k[i] (kTileKeys / 2 x d), over their first key_chunks[i] 32-key chunks.
  void (*dq)(float* dq, int64_t rows, int64_t d, int n, const uint16_t* const* ds_rows,
             const uint32_t* const* k, const int64_t* key_chunks);
  // c[m x kTileKeys] += the sum over n query tiles of a[i] (m x kTileRows bfloat16: q^T or
  // dO^T) . pairs[i] (dS or P as weights() wrote them), over their first row_chunks[i] 32-row
  // chunks; m = d or dv (a multiple of dim_multiple). dK^T (unscaled) and dV^T of a key tile.
  void (*key_gradient)(float* c, int64_t m, int n, const uint16_t* const* a,
                       const uint32_t* const* pairs, const int64_t* row_chunks);
  // d and dv must be multiples of this: the tile unit's 32 (its pair chunks), or 2 (whole
  // pairs) for vdpbf16ps, whose last vector of a row is masked.
  int64_t dim_multiple;
};

// What a storage encoding of K and V needs of each ISA (the traits table, indexed by Elem):
// how to stage its rows for the float32 step. Compute-type rows need nothing (nullptr).
struct EncodingOps {
  // rows (ld elements apart) -> rows x width floats, contiguous; row j times scales[j *
  // scale_ld] for an encoding with scales (int8), which the others ignore (nullptr). ahead:
  // nullptr, or the rows (ld apart) to ask the caches for as these are converted (the next
  // key tile's), so that memory works while the step computes.
  void (*to_float)(const void* src, int64_t ld, const float* scales, int64_t scale_ld, int64_t rows,
                   int64_t width, float* dst, const void* ahead);
  // dst[i] = x[i] * a, i < n, rounded to this encoding as convert.h rounds (to nearest even,
  // NaN kept quiet): an output row in half precision. nullptr for int8 (no int8 outputs).
  void (*from_float)(const float* x, float a, int64_t n, void* dst);
};

struct KernelSet {
  const char* name;
  void (*step_f32)(const TileStep<float>&);
  void (*step_f64)(const TileStep<double>&);
  // K rows [0, cols), ld elements apart, -> d x kTileKeys transposed tile, zero in columns
  // [cols, zero_to) (what the step reads past cols: padded_keys).
  void (*pack_f32)(const float* k, int64_t ld, int64_t cols, int64_t d, float* kt, int64_t zero_to);
  void (*pack_f64)(const double* k, int64_t ld, int64_t cols, int64_t d, double* kt,
                   int64_t zero_to);
  EncodingOps encodings[kElems];
  // y[i] = x[i] * a, i < n: q rows times the softmax scale into the tile.
  void (*scale_f32)(const float* x, float a, int64_t n, float* y);
  void (*scale_f64)(const double* x, double a, int64_t n, double* y);
  // A finished tile's rows [0, rows): sums[r] = row r's kSumSlots partial sums (slots, as the
  // step leaves them) added pairwise, and, when out is set, out[r][e] = o[r * dv + e] / sums[r]
  // (0 where the sum is 0).
  void (*finish_f32)(const float* o, const float* slots, int64_t rows, int64_t dv,
                     float* const* out, float* sums);
  void (*finish_f64)(const double* o, const double* slots, int64_t rows, int64_t dv,
                     double* const* out, double* sums);
  // y[i] = the kernel's exp(x[i]): exposed so tests can hold it to np.exp.
  void (*exp_f32)(const float* x, float* y, int64_t n);
  void (*exp_f64)(const double* x, double* y, int64_t n);
  // One pair of the backward pass (BackwardStep).
  void (*backward_f32)(const BackwardStep<float>&);
  void (*backward_f64)(const BackwardStep<double>&);

  // bfloat16 K and V multiplied as bfloat16 pairs (AVX512-BF16); nullptr where the ISA has no
  // such instruction, and K and V are then converted to float32 for step_f32. Keys as
  // Bf16PairsT, or Rows of bfloat16 (every row inside the array: step_bf16_amx reads all
  // kTileKeys rows, d_pairs pairs each; step_bf16 rows [0, cols), d elements each); values as
  // Bf16Pairs, or (step_bf16 only) bfloat16 Rows.
  void (*step_bf16)(const TileStep<float>&);
  // The same on AMX tile registers (nullptr where absent): needs Dv % 16 == 0 and d_pairs a
  // multiple of kAmxPairs, the pairs past D zero. Preferred over step_bf16 where both exist.
  void (*step_bf16_amx)(const TileStep<float>&);
  // Each thread calls amx_begin before its first step_bf16_amx of a call and amx_end after
  // its last: the tile register configuration is per thread state, and other code in the
  // same thread may use another one between calls.
  void (*amx_begin)();
  void (*amx_end)();
  // The backward's bfloat16 products (nullptr members where absent).
  Bf16BackwardKernels backward_bf16;
  // K rows [0, cols), ld elements apart -> `pairs` x kTileKeys pairs, zero past d and cols.
  void (*pack_bf16_keys)(const uint16_t* k, int64_t ld, int64_t cols, int64_t d, int64_t pairs,
                         uint32_t* kt);
  // V rows [0, cols) (cols: the staged keys) -> (cols + 1) / 2 rows of `width` (>= dv) pairs,
  // zero past dv and past cols up to a whole kAmxPairs rows. Returns the first of those keys
  // whose V row holds an inf or NaN, or -1.
  int64_t (*pack_bf16_values)(const uint16_t* v, int64_t ld, int64_t cols, int64_t dv,
                              int64_t width, uint32_t* vt);
};

// Kernels compiled into this build, best last. Only those the CPU supports are ever called.
extern const KernelSet kScalarKernels;
#if CPUATTN_HAVE_X86_KERNELS
extern const KernelSet kAvx2Kernels;
extern const KernelSet kAvx512Kernels;
#endif
#if CPUATTN_HAVE_BF16_KERNELS
extern const KernelSet kAvx512Bf16Kernels;
#endif
#if CPUATTN_HAVE_AMX_KERNELS
extern const KernelSet kAvx512AmxKernels;
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
