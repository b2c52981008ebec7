// Portable body of the tile step: register-blocked loops over GCC/Clang vector extensions,
// compiled once per ISA with that ISA's vector width (CPUATTN_VEC_BYTES, set by the includer).
// Include it inside namespace cpuattn::CPUATTN_TARGET and an anonymous namespace there only:
// every ISA's copy must have internal linkage, or the linker may merge an AVX-512 copy into the
// scalar path (target.h). No std:: function templates here (std::min, std::clamp) for the
// same reason: their instances are shared between translation units; std:: types and
// constants (numeric_limits, integer_sequence) emit no code and are fine. The includer
// includes kernels/kernel.h first (it brings the standard headers).
#if !defined(CPUATTN_TARGET) || defined(CPUATTN_TARGET_IS_BASELINE)
#error "a kernel defines CPUATTN_TARGET (its ISA's name) before any include (target.h)"
#endif

#include "exp.h"

#ifndef CPUATTN_VEC_BYTES
#error "define CPUATTN_VEC_BYTES (16, 32 or 64) before including tile_step.inl"
#endif

#include "kernels/simd.inl"

// Register blocking: kRowBlock rows x kColBlock vectors of accumulators, plus kColBlock operand
// vectors and one broadcast. 6 x 4 + 4 + 1 = 29 of 32 AVX-512 registers; with 16 registers
// (AVX2, SSE) 6 x 2 + 2 + 1 = 15. Leftover rows: for_row_blocks.
// The inner loops are unrolled 4x (#pragma below): +2% (D = 64) and +6% (D = 128) single
// thread, measured A/B.
constexpr int kRowBlock = 6;
constexpr int kColBlock = CPUATTN_VEC_BYTES == 64 ? 4 : 2;

// A tile's rows in register blocks, as f(RowBlock<rows>{}, first row, block index): kRowBlock
// rows at a time, then 4, then the last 3 at once, else one at a time; one or two rows past
// the kRowBlock blocks go with one block fewer as 4 + 3 or 4 + 4. Each block is a pass over
// the tile's K and V, and a single row does a sixth of a block's products per operand load:
// decode with 3 query heads a kv head takes one pass, not three (1.4-1.7x warm, 1.2x on a
// bfloat16 cache from memory). Two rows stay 1 + 1: a block of 2 was 1.36x faster on caches
// in L3 but 0.92x from memory (float32, measured), and added a fifth of the kernels' code.
template <int N>
struct RowBlock {
  static constexpr int kRows = N;
};
template <typename F>
inline void for_row_blocks(int64_t rows, F&& f) {
  const int64_t blocks = rows / kRowBlock, tail = rows % kRowBlock;
  const int64_t full = blocks > 0 && (tail == 1 || tail == 2) ? blocks - 1 : blocks;
  int64_t r = 0, b = 0;
  for (; b < full; r += kRowBlock) f(RowBlock<kRowBlock>{}, r, b++);
  for (; r + 4 <= rows; r += 4) f(RowBlock<4>{}, r, b++);
  if (r + 3 == rows) {
    f(RowBlock<3>{}, r, b++);
    return;
  }
  for (; r < rows; ++r) f(RowBlock<1>{}, r, b++);
}
inline int64_t row_blocks(int64_t rows) {
  int64_t n = 0;
  for_row_blocks(rows, [&](auto, int64_t, int64_t) { ++n; });
  return n;
}

#include "kernels/epilogue.inl"

// s[r0 + r, c0 : c0 + CB * L] = q[r0 + r, :] . K^T[:, c0 : ...] for RB rows, as the sum over
// head dims [e0, e1): added to what s holds when kAccumulate (the same chain of FMAs, so the
// same bits, as one pass over all of D), and times dot_scale when `last` and q is in place.
template <typename T, int RB, int CB, bool kAccumulate>
__attribute__((always_inline)) inline void score_block(const cpuattn::TileStep<T>& a, int64_t r0,
                                                       int64_t c0, int64_t e0, int64_t e1,
                                                       bool last) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const T* q = a.q + r0 * a.q_ld;
  T* s = a.s + r0 * W + c0;
  V acc[RB][CB];  // set one by one: `= {}` became a rep stos to a stack copy, out of line
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) acc[r][c] = kAccumulate ? S::load(s + r * W + c * L) : V{};
  }
#pragma GCC unroll 4
  for (int64_t e = e0; e < e1; ++e) {
    V kv[CB];
    for (int c = 0; c < CB; ++c) kv[c] = S::load(elements<T>(a.key) + e * W + c0 + c * L);
    for (int r = 0; r < RB; ++r) {
      const V qe = S::splat(q[r * a.q_ld + e]);
      for (int c = 0; c < CB; ++c) acc[r][c] += qe * kv[c];
    }
  }
  // Only the stores here; softcap and the rest come after, over the stored rows
  // (score_epilogue). With softcap (or a test per vector) inside this loop GCC kept acc in a
  // stack array, zeroed by rep stos and every vector stored and reloaded (a MiniLM batch
  // took 1.08x the time).
  if (last && a.q_unscaled) {
    for (int r = 0; r < RB; ++r) {
      for (int c = 0; c < CB; ++c) S::store(s + r * W + c * L, acc[r][c] * a.dot_scale);
    }
  } else {
    for (int r = 0; r < RB; ++r) {
      for (int c = 0; c < CB; ++c) S::store(s + r * W + c * L, acc[r][c]);
    }
  }
}

// Columns [0, width) of a score tile (width a whole number of vectors: score_width) as
// f(ColBlock<vectors>{}, first column): blocks of kColBlock vectors, then 2, then 1. A short
// tile's products stop at its keys: a 32-key tile (sentences) did twice the products it needed.
template <int N>
struct ColBlock {
  static constexpr int kVectors = N;
};
template <typename T, typename F>
inline void for_column_blocks(int64_t width, F&& f) {
  constexpr int64_t L = Simd<T>::kLanes;
  static_assert(cpuattn::kTileKeys % (L * kColBlock) == 0, "whole column blocks a tile");
  int64_t c0 = 0;
  for (; c0 + kColBlock * L <= width; c0 += kColBlock * L) f(ColBlock<kColBlock>{}, c0);
  if constexpr (kColBlock > 2) {
    if (c0 + 2 * L <= width) {
      f(ColBlock<2>{}, c0);
      c0 += 2 * L;
    }
  }
  if (c0 < width) f(ColBlock<1>{}, c0);
}

// score_block over columns [0, width) of a tile narrower than kTileKeys (its last keys), in
// for_column_blocks' blocks. Out of line: inlined next to the whole tiles' blocks, these made
// GCC keep a whole tile's accumulators in a stack array, stored and reloaded (0.95x, MiniLM).
template <typename T, int RB, bool kAccumulate>
__attribute__((noinline)) void score_rows_narrow(const cpuattn::TileStep<T>& a, int64_t r0,
                                                 int64_t e0, int64_t e1, bool last, int64_t width) {
  for_column_blocks<T>(width, [&](auto block, int64_t c0) {
    score_block<T, RB, decltype(block)::kVectors, kAccumulate>(a, r0, c0, e0, e1, last);
  });
}

// Scores of RB rows over columns [0, width) of the packed K^T (score_width).
template <typename T, int RB, bool kAccumulate = false>
inline void score_rows(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int64_t e1, bool last,
                       int64_t width) {
  constexpr int64_t W = cpuattn::kTileKeys, L = Simd<T>::kLanes;
  if (width < W) {
    score_rows_narrow<T, RB, kAccumulate>(a, r0, e0, e1, last, width);
    return;
  }
  for (int64_t c0 = 0; c0 < W; c0 += kColBlock * L) {
    score_block<T, RB, kColBlock, kAccumulate>(a, r0, c0, e0, e1, last);
  }
}

// Scores from K rows in place (a.key: ld elements apart, or its row table), for RB rows: the
// dot-product form, s[r, j] = q[r, :] . K[j, :], vectorized along D. For a few query rows (decode)
// this beats packing K^T, which costs a transposing pass over every K tile for only a few rows of
// products. Keys go L at a time, KB keys x RB rows of accumulators at once, folded part way; the
// rest of the tree and one permutation give the L scores in key order. The D % L trailing elements
// are added per score afterwards. With prefetch_next, each K line read asks for the same line of
// the next tile (into L2): the hardware prefetchers alone left decode at ~60% of the memory
// bandwidth.
template <typename T, int RB, Elem Stored>
inline void score_rows_in_place(const cpuattn::TileStep<T>& a, int64_t r0) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = cpuattn::kTileKeys, L = S::kLanes;
  constexpr int KB = kColBlock < L ? kColBlock : L;  // keys per register block
  constexpr int kGroups = L / KB;
  static_assert(W % L == 0 && (L & (L - 1)) == 0, "whole vectors of keys, lanes a power of 2");
  const T* q = a.q + r0 * a.d;  // packed: q_ld == d
  const auto* rows = key_rows<Stored>(a);
  const int64_t d_main = a.d / L * L;
  for (int64_t jb = 0; jb < a.cols; jb += L) {
    V folded[RB][kGroups];
    for (int g = 0; g < kGroups; ++g) {
      decltype(rows) k[KB];
      const char* ahead[KB];  // the same keys' rows in the next tile
      for (int n = 0; n < KB; ++n) {
        const int64_t j = jb + g * KB + n < a.cols ? jb + g * KB + n : 0;  // past cols: any
        k[n] = row_of(a.key, rows, j);  // valid row, masked later
        ahead[n] = a.prefetch_next ? next_row(a.key, j) : nullptr;
      }
      // One request per line of each row (a vector of narrow elements is a part of one),
      // ahead of the loop: a test per vector in it costs more than the requests. At most
      // kAheadLines a row (D = 256 float32), so that a large head does not queue hundreds at
      // once; the rest of a long row is one stream the hardware prefetcher follows.
      if (a.prefetch_next) {
        constexpr int64_t kAheadLines = 16;
        const int64_t row_bytes = a.d * int64_t(sizeof(*rows));
        const int64_t bytes = row_bytes < 64 * kAheadLines ? row_bytes : 64 * kAheadLines;
        for (int n = 0; n < KB; ++n) {
          for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(ahead[n] + b, 0, 1);
        }
      }
      // Zeroed one by one: `= {}` became a rep stos to a stack copy (AVX2: 10 % of the time
      // here; decode 1.11x without it).
      V acc[RB][KB];
      for (int r = 0; r < RB; ++r) {
        for (int n = 0; n < KB; ++n) acc[r][n] = V{};
      }
#pragma GCC unroll 2
      for (int64_t e = 0; e < d_main; e += L) {
        V kv[KB];
        for (int n = 0; n < KB; ++n) kv[n] = load_elements<Stored, T>(k[n] + e);
        for (int r = 0; r < RB; ++r) {
          const V qv = S::load(q + r * a.d + e);
          for (int n = 0; n < KB; ++n) acc[r][n] += qv * kv[n];
        }
      }
      if (d_main < a.d) {  // the last d % L elements of the rows: one vector, zero-filled
        const int n_tail = int(a.d - d_main);
        V kv[KB];
        for (int n = 0; n < KB; ++n) kv[n] = load_partial<Stored, T>(k[n] + d_main, n_tail);
        for (int r = 0; r < RB; ++r) {
          const V qv = load_partial<Elem::Compute, T>(q + r * a.d + d_main, n_tail);
          for (int n = 0; n < KB; ++n) acc[r][n] += qv * kv[n];
        }
      }
      for (int r = 0; r < RB; ++r) folded[r][g] = fold_tree<L, KB>(acc[r]);
    }
    for (int r = 0; r < RB; ++r) {
      S::store(a.s + (r0 + r) * W + jb, in_key_order(fold_tree<L / KB, kGroups>(folded[r]),
                                                     std::make_integer_sequence<int, L>{}));
    }
  }
}

// Bahdanau scores: s[r0 + r, :] = sum_e w[e] tanh(q[r0 + r, e] + K^T[e, :]), for RB rows and
// the columns score_width covers; the same register blocking as score_rows, a tanh per term
// instead of a product.
template <typename T, int RB>
inline void additive_score_rows(const cpuattn::TileStep<T>& a, int64_t r0) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const T* q = a.q + r0 * a.d;  // packed: q_ld == d
  for_column_blocks<T>(score_width(a), [&](auto block, int64_t c0) {
    constexpr int CB = decltype(block)::kVectors;
    V acc[RB][CB];  // set one by one, as in score_block
    for (int r = 0; r < RB; ++r) {
      for (int c = 0; c < CB; ++c) acc[r][c] = V{};
    }
    for (int64_t e = 0; e < a.d; ++e) {
      V kv[CB];
      for (int c = 0; c < CB; ++c) kv[c] = S::load(elements<T>(a.key) + e * W + c0 + c * L);
      const V w = S::splat(a.additive_w[e]);
      for (int r = 0; r < RB; ++r) {
        const V qe = S::splat(q[r * a.d + e]);
        for (int c = 0; c < CB; ++c) acc[r][c] += w * fast_tanh(qe + kv[c]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      for (int c = 0; c < CB; ++c) S::store(a.s + (r0 + r) * W + c0 + c * L, acc[r][c]);
    }
  });
}

// The weight of output row r and summed index j in a.s: row-major for P.V (s[r][j]) or, with
// kTransposed, column-major (the backward's P^T dO and dS^T q read P and dS as they are).
template <bool kTransposed, typename T>
inline T weight(const cpuattn::TileStep<T>& a, int64_t r, int64_t j) {
  constexpr int64_t W = cpuattn::kTileKeys;
  return kTransposed ? a.s[j * W + r] : a.s[r * W + j];
}

// o[r0 + r, e0 : e0 + CB * L] += p[r0 + r, :cols] . V[:cols, e0 : e0 + CB * L], for RB rows.
// kPrefetch: a.prefetch_next, kTable: a.value.rows set, decided once per block rather than
// tested per key (a test per key cost prefill 5-15 %, measured).
template <typename T, int RB, int CB, Elem Stored, bool kPrefetch, bool kTransposed = false,
          bool kTable = false>
inline void pv_block(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t L = S::kLanes;
  const auto* rows = value_rows<Stored>(a);
  if (a.cols <= 0) return;  // never, but without it GCC keeps acc in a stack array
  V acc[RB][CB];
  // Unrolled before GCC's scalar replacement runs, which needs constant indices: left to
  // its heuristics this loop stayed rolled with prefetches and narrow loads below, and
  // acc lived on the stack (loaded and stored every key: a third of decode's P.V time).
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) acc[r][c] = S::load(a.o + (r0 + r) * a.dv + e0 + c * L);
  }
#pragma GCC unroll 4
  for (int64_t j = 0; j < a.cols; ++j) {
    V vv[CB];
    const auto* row = kTable
                          ? reinterpret_cast<decltype(rows)>(a.value.rows[j] + a.value.row_offset)
                          : rows + j * a.value.ld;
    for (int c = 0; c < CB; ++c) vv[c] = load_elements<Stored, T>(row + e0 + c * L);
    for (int r = 0; r < RB; ++r) {
      const V p = S::splat(weight<kTransposed>(a, r0 + r, j));
      for (int c = 0; c < CB; ++c) acc[r][c] += p * vv[c];
    }
    // One request per 64 bytes of the block (a vector of narrow elements is a part of a
    // line), without a test per key. Narrower blocks start where they may (e0 a multiple of
    // L): a line may then be asked for twice, which is harmless.
    if constexpr (kPrefetch) {
      constexpr int64_t kBlockBytes = CB * L * int64_t(sizeof(*rows));
      const char* ahead = next_row(a.value, j) + e0 * int64_t(sizeof(*rows));
      for (int64_t b = 0; b < kBlockBytes; b += 64) __builtin_prefetch(ahead + b, 0, 1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < CB; ++c) S::store(a.o + (r0 + r) * a.dv + e0 + c * L, acc[r][c]);
  }
}

// o[r0 + r, e0 : e0 + N] += p[r0 + r, :cols] . V[:cols, e0 : e0 + N] for RB rows, with a vector
// of N < kLanes compute-type elements: the columns past a row's last whole vector (D = 40 has 8
// of them on AVX-512), which one element at a time took 3.5x the whole call's time. Returns
// the first column it did not do.
template <typename T, int RB, int N, bool kTransposed, bool kTable>
inline int64_t pv_narrow(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int64_t e1) {
  if constexpr (N < 2) {
    return e0;
  } else {
    typedef T H __attribute__((vector_size(N * sizeof(T))));
    if (e1 - e0 < N) return e0;
    const auto* rows = value_rows<Elem::Compute>(a);
    H acc[RB];
    for (int r = 0; r < RB; ++r) __builtin_memcpy(&acc[r], a.o + (r0 + r) * a.dv + e0, sizeof(H));
    for (int64_t j = 0; j < a.cols; ++j) {
      const T* row = kTable ? reinterpret_cast<const T*>(a.value.rows[j] + a.value.row_offset)
                            : rows + j * a.value.ld;
      H v;
      __builtin_memcpy(&v, row + e0, sizeof(H));
      for (int r = 0; r < RB; ++r) acc[r] += (weight<kTransposed>(a, r0 + r, j) - H{}) * v;
    }
    for (int r = 0; r < RB; ++r) __builtin_memcpy(a.o + (r0 + r) * a.dv + e0, &acc[r], sizeof(H));
    return e0 + N;
  }
}

// o[r0 + r, e0 : e0 + n] += p[r0 + r, :cols] . V[:cols, e0 : e0 + n] for RB rows, n < kLanes:
// the columns past a row's last whole vector, as one zero-filled vector (load_partial) for
// rows of float16, bfloat16 or int8.
template <typename T, int RB, Elem Stored, bool kTransposed, bool kTable>
inline void pv_partial(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int n) {
  using S = Simd<T>;
  using V = typename S::V;
  const auto* rows = value_rows<Stored>(a);
  if (a.cols <= 0) return;  // never, but it keeps acc in registers (as in pv_block)
  V acc[RB];
  for (int r = 0; r < RB; ++r)
    acc[r] = load_partial<Elem::Compute, T>(a.o + (r0 + r) * a.dv + e0, n);
  for (int64_t j = 0; j < a.cols; ++j) {
    const auto* row = kTable
                          ? reinterpret_cast<decltype(rows)>(a.value.rows[j] + a.value.row_offset)
                          : rows + j * a.value.ld;
    const V v = load_partial<Stored, T>(row + e0, n);
    for (int r = 0; r < RB; ++r) acc[r] += S::splat(weight<kTransposed>(a, r0 + r, j)) * v;
  }
  for (int r = 0; r < RB; ++r) store_partial<T>(a.o + (r0 + r) * a.dv + e0, acc[r], n);
}

// pv_block over output columns [e0, e1) for RB rows: e0 a multiple of kColBlock vectors, e1
// too or dv (then blocks of 2 and 1 vectors, and the rest: for compute-type rows narrower
// vectors and single columns, for others one zero-filled vector).
template <typename T, int RB, Elem Stored, bool kPrefetch, bool kTransposed = false,
          bool kTable = false>
inline void pv_columns(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int64_t e1) {
  constexpr int64_t L = Simd<T>::kLanes;
  for (; e0 + kColBlock * L <= e1; e0 += kColBlock * L) {
    pv_block<T, RB, kColBlock, Stored, kPrefetch, kTransposed, kTable>(a, r0, e0);
  }
  if constexpr (kColBlock > 2) {  // e.g. Dv = 32 on AVX-512: one block of 2, not 2 of 1
    for (; e0 + 2 * L <= e1; e0 += 2 * L) {
      pv_block<T, RB, 2, Stored, kPrefetch, kTransposed, kTable>(a, r0, e0);
    }
  }
  for (; e0 + L <= e1; e0 += L) {
    pv_block<T, RB, 1, Stored, kPrefetch, kTransposed, kTable>(a, r0, e0);
  }
  if constexpr (Stored == Elem::Compute) {
    e0 = pv_narrow<T, RB, L / 2, kTransposed, kTable>(a, r0, e0, e1);
    e0 = pv_narrow<T, RB, L / 4, kTransposed, kTable>(a, r0, e0, e1);
  } else if (e0 < e1) {
    pv_partial<T, RB, Stored, kTransposed, kTable>(a, r0, e0, int(e1 - e0));
    return;
  }
  if (e0 == e1) return;
  const auto* rows = value_rows<Stored>(a);
  for (int r = 0; r < RB; ++r) {  // the last dv % L columns
    T* o = a.o + (r0 + r) * a.dv;
    for (int64_t j = 0; j < a.cols; ++j) {
      const T p = weight<kTransposed>(a, r0 + r, j);
      const auto* vr = row_of(a.value, rows, j);
      for (int64_t e = e0; e < e1; ++e) o[e] += p * element<Stored, T>(vr, e);
    }
  }
}

// Whether V rows [0, cols) hold an inf or NaN (x - x is NaN exactly for those). Vector
// accumulators: a scalar chain of adds here cost as much as the tile's whole P.V.
template <typename T, Elem Stored>
inline bool tile_v_has_nonfinite(const cpuattn::TileStep<T>& a) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t L = S::kLanes;
  const auto* rows = value_rows<Stored>(a);
  V acc = V{};
  T tail = 0;
  for (int64_t j = 0; j < a.cols; ++j) {
    const auto* vr = row_of(a.value, rows, j);
    int64_t e = 0;
    for (; e + L <= a.dv; e += L) {
      const V x = load_elements<Stored, T>(vr + e);
      acc += x - x;
    }
    for (; e < a.dv; ++e) tail += element<Stored, T>(vr, e) - element<Stored, T>(vr, e);
  }
  bool nonfinite = tail != tail;
  for (int64_t i = 0; i < L; ++i) nonfinite |= acc[i] != acc[i];
  return nonfinite;
}

// P.V for rows [r0, r1) that skips weights of exactly 0, so an inf or NaN in V reaches only
// the rows that give its key a weight (0 * inf would be NaN). Rare: only for such tiles.
template <typename T, Elem Stored, bool kTransposed = false>
inline void pv_rows_skip_zero_weights(const cpuattn::TileStep<T>& a, int64_t r0, int64_t r1) {
  const auto* rows = value_rows<Stored>(a);
  for (int64_t r = r0; r < r1; ++r) {
    T* o = a.o + r * a.dv;
    for (int64_t j = 0; j < a.cols; ++j) {
      const T p = weight<kTransposed>(a, r, j);
      if (p == T(0)) continue;
      const auto* vr = row_of(a.value, rows, j);
      for (int64_t e = 0; e < a.dv; ++e) o[e] += p * element<Stored, T>(vr, e);
    }
  }
}

// pv_columns with its block choices (prefetch, row table) made once.
template <typename T, int RB, Elem Stored>
inline void pv_all(const cpuattn::TileStep<T>& a, int64_t r0, int64_t e0, int64_t e1) {
  if (a.value.rows) {
    if (a.prefetch_next) {
      pv_columns<T, RB, Stored, true, false, true>(a, r0, e0, e1);
    } else {
      pv_columns<T, RB, Stored, false, false, true>(a, r0, e0, e1);
    }
  } else if (a.prefetch_next) {
    pv_columns<T, RB, Stored, true>(a, r0, e0, e1);
  } else {
    pv_columns<T, RB, Stored, false>(a, r0, e0, e1);
  }
}

// o[r0 .. r0 + RB) += p . V from the weights score_epilogue left in a.s (some_zero: its
// result), V rows read as Stored says. v_nonfinite: whether the tile's V holds an inf or NaN, -1
// until a row first needs to know.
template <typename T, int RB, Elem Stored>
inline void weights_times_values(const cpuattn::TileStep<T>& a, int64_t r0, bool some_zero,
                                 int& v_nonfinite) {
  // int8 V holds no inf or NaN (its scales multiply the weights, which stay 0 where 0): a
  // weight of 0 adds exactly 0, and the scan below would widen the whole tile for nothing.
  if (Stored != Elem::I8 && some_zero) {
    if (v_nonfinite < 0) v_nonfinite = tile_v_has_nonfinite<T, Stored>(a);  // once a tile
    if (v_nonfinite) {
      pv_rows_skip_zero_weights<T, Stored>(a, r0, r0 + RB);
      return;
    }
  }
  pv_all<T, RB, Stored>(a, r0, 0, a.dv);
}

// s[r0 + r, j] *= scales[j * ld] for RB rows and keys [0, cols): an int8 row's scale, on its
// score (K) or its weight (V). The scales of one run of L keys are loaded once for all rows.
// kWeights: a weight of 0 stays 0, so that a key a row does not keep never reaches it, even
// with a NaN or inf scale (the score path needs no such care: the epilogue masks scores).
template <typename T, int RB, bool kWeights>
inline void times_row_scales(const cpuattn::TileStep<T>& a, int64_t r0, const float* scales,
                             int64_t ld) {
  using S = Simd<T>;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  for (int64_t jb = 0; jb < a.cols; jb += L) {
    typename S::V sv;
    if (ld == 1 && jb + L <= a.cols) {
      sv = S::load(scales + jb);
    } else {
      for (int64_t i = 0; i < L; ++i) sv[i] = jb + i < a.cols ? T(scales[(jb + i) * ld]) : T(0);
    }
    for (int r = 0; r < RB; ++r) {
      T* s = a.s + (r0 + r) * W + jb;
      const typename S::V x = S::load(s);
      if constexpr (kWeights) {
        S::store(s, x == 0 ? x : x * sv);
      } else {
        S::store(s, x * sv);
      }
    }
  }
}

// Rows [r0, r0 + RB) against the tile, start to finish: scores, epilogue, P.V. Working a few
// rows at a time keeps their scores, the packed K tile and the V tile in L1.
// Stored: how the K and V rows read in place are stored (key.form Rows and value.form Rows;
// a packed K^T is always in the compute type).
template <typename T, int RB, Elem Stored>
inline void step_rows(const cpuattn::TileStep<T>& a, int64_t r0, int& v_nonfinite) {
  if (Stored != Elem::Compute || a.key.form == cpuattn::KeyForm::Rows) {
    score_rows_in_place<T, RB, Stored>(a, r0);
  } else if (a.additive_w) {
    additive_score_rows<T, RB>(a, r0);
  } else {
    score_rows<T, RB>(a, r0, 0, a.d, true, score_width(a));
  }
  if constexpr (Stored == Elem::I8) {
    times_row_scales<T, RB, false>(a, r0, a.key.scales, a.key.scale_ld);
  }
  const bool some_zero = score_epilogue<T, RB>(a, r0);
  // int8 V: each weight times its key's V scale, after the epilogue summed the weights.
  if constexpr (Stored == Elem::I8)
    times_row_scales<T, RB, true>(a, r0, a.value.scales, a.value.scale_ld);
  weights_times_values<T, RB, Stored>(a, r0, some_zero, v_nonfinite);
}

// Walks a.prefetch over a step's row blocks: each block asks for its even share of every
// range's lines (divisions once per range and step, none per block or line).
class Prefetcher {
 public:
  template <typename T>
  Prefetcher(const cpuattn::TileStep<T>& a, int64_t blocks) {
    for (int i = 0; i < cpuattn::kPrefetchRanges; ++i) {
      const cpuattn::PrefetchRange& p = a.prefetch[i];
      left_[i] = p.lines;
      per_block_[i] = (p.lines + blocks - 1) / blocks;
      if (p.lines == 0) continue;
      row_lines_[i] = p.row_lines;
      stride_[i] = p.stride;
      row_[i] = p.at + p.first / p.row_lines * p.stride;
      col_[i] = p.first % p.row_lines;
    }
  }
  void block() {
    for (int i = 0; i < cpuattn::kPrefetchRanges; ++i) {
      const int64_t n = per_block_[i] < left_[i] ? per_block_[i] : left_[i];
      for (int64_t k = 0; k < n; ++k) {
        __builtin_prefetch(row_[i] + 64 * col_[i], 0, 2);
        __asm__ __volatile__("");  // GCC drops prefetches it can prove change nothing else
        if (++col_[i] == row_lines_[i]) {
          col_[i] = 0;
          row_[i] += stride_[i];
        }
      }
      left_[i] -= n;
    }
  }

 private:
  const char* row_[cpuattn::kPrefetchRanges] = {};
  int64_t col_[cpuattn::kPrefetchRanges] = {}, row_lines_[cpuattn::kPrefetchRanges] = {};
  int64_t stride_[cpuattn::kPrefetchRanges] = {};
  int64_t left_[cpuattn::kPrefetchRanges], per_block_[cpuattn::kPrefetchRanges];
};

// Row block by row block, each start to finish (step_rows): K rows in place, additive scores,
// and d + dv below kPhasedMinDims, where a tile's K^T and V stay in L1/L2 between blocks.
template <typename T, Elem Stored>
void tile_step_rows(const cpuattn::TileStep<T>& a) {
  int v_nonfinite = -1;  // unknown until some weight is 0
  Prefetcher prefetch(a, row_blocks(a.rows));
  for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t) {
    prefetch.block();
    step_rows<T, decltype(block)::kRows, Stored>(a, r, v_nonfinite);
  });
}

// Narrow tiles on AVX-512 (packed K^T, scores and Dv of at most 2 vectors a row:
// sentence-sized heads): rows in blocks of 8, whose 16 accumulators still fit the 32
// registers, rather than 6 and 4: 4 blocks for 32 rows instead of 6, each with its own
// epilogue and pass over K^T and V. The same per-row arithmetic, so the same bits. Zen 4,
// paired: (32, 12, 32, 32) 1.02-1.07x, (32, 12, 16, 32) 1.05-1.07x, (32, 12, 24, 32)
// 1.03-1.06x, with a padding mask 1.01-1.03x.
constexpr int kNarrowRowBlock = 8;
template <typename T>
inline bool narrow_tile(const cpuattn::TileStep<T>& a) {
  constexpr int64_t L = Simd<T>::kLanes;
  return a.key.form == cpuattn::KeyForm::PackedT && !a.additive_w && !a.value.rows &&
         score_width(a) <= 2 * L && (a.dv == L || a.dv == 2 * L) && a.rows >= kNarrowRowBlock;
}
template <typename T, int CB, bool kPrefetch>
inline void narrow_values(const cpuattn::TileStep<T>& a, int64_t r0) {
  pv_block<T, kNarrowRowBlock, CB, Elem::Compute, kPrefetch>(a, r0, 0);
}
template <typename T>
__attribute__((noinline)) void narrow_rows(const cpuattn::TileStep<T>& a, int64_t r0,
                                           int& v_nonfinite) {
  constexpr int64_t L = Simd<T>::kLanes;
  constexpr int RB = kNarrowRowBlock;
  const int64_t width = score_width(a);
  if (width == L) {
    score_block<T, RB, 1, false>(a, r0, 0, 0, a.d, true);
  } else {
    score_block<T, RB, 2, false>(a, r0, 0, 0, a.d, true);
  }
  const bool some_zero = score_epilogue<T, RB>(a, r0);
  if (some_zero) {
    if (v_nonfinite < 0) v_nonfinite = tile_v_has_nonfinite<T, Elem::Compute>(a);
    if (v_nonfinite) {
      pv_rows_skip_zero_weights<T, Elem::Compute>(a, r0, r0 + RB);
      return;
    }
  }
  if (a.dv == L) {
    a.prefetch_next ? narrow_values<T, 1, true>(a, r0) : narrow_values<T, 1, false>(a, r0);
  } else {
    a.prefetch_next ? narrow_values<T, 2, true>(a, r0) : narrow_values<T, 2, false>(a, r0);
  }
}
// One or two rows past the 8-blocks go with one 8-block fewer, as 6 + 3 or 6 + 4 (as
// for_row_blocks does): not one or two passes of a single row.
template <typename T>
void tile_step_narrow(const cpuattn::TileStep<T>& a) {
  int v_nonfinite = -1;
  int64_t blocks = a.rows / kNarrowRowBlock;
  if (const int64_t tail = a.rows % kNarrowRowBlock; tail == 1 || tail == 2) --blocks;
  const int64_t rest = a.rows - blocks * kNarrowRowBlock;
  Prefetcher prefetch(a, blocks + (rest > 0 ? row_blocks(rest) : 0));
  int64_t r = 0;
  for (; r < blocks * kNarrowRowBlock; r += kNarrowRowBlock) {
    prefetch.block();
    narrow_rows(a, r, v_nonfinite);
  }
  for_row_blocks(a.rows - r, [&](auto block, int64_t rr, int64_t) {
    prefetch.block();
    step_rows<T, decltype(block)::kRows, Elem::Compute>(a, r + rr, v_nonfinite);
  });
}

// Large heads take the tile phase by phase, so that each slice of K^T and V is read from L2
// once for all rows rather than once per row block (at D = 4096 a tile's K^T and V are 1 MiB
// each, and row-block order streamed them from L3 once per row block, 11 times a tile):
// scores with D in slices of kScoreDepth (a kScoreDepth x kTileKeys slice of K^T serves every
// row block, the partial scores accumulated in a.s: the same FMA chain, the same bits), then
// the epilogue, then P.V with Dv in slices of kValueWidth columns (kTileKeys x kValueWidth of
// V per slice).
// Measured on a Xeon (AVX-512, 2 cores), (1, 1, 512, D) float32: D = 4096 1.3x faster (one
// and two threads), D = 512 and 1024 the same either way; slices of 64 or 256 no better.
constexpr int64_t kPhasedMinDims = 1024;  // d + dv
constexpr int64_t kScoreDepth = 128;
constexpr int64_t kValueWidth = 128;

template <typename T>
void tile_step_phased(const cpuattn::TileStep<T>& a) {
  static_assert(kValueWidth % (kColBlock * Simd<T>::kLanes) == 0, "whole column blocks a slice");
  constexpr int64_t kMaxBlocks = cpuattn::kTileRows;  // rows <= kTileRows, blocks >= 1 row
  bool some_zero[kMaxBlocks];
  Prefetcher prefetch(a, row_blocks(a.rows));
  const int64_t width = score_width(a);
  int64_t e0 = 0;
  do {  // once at least: with d = 0 the scores are 0, and they must be written
    const int64_t e1 = a.d - e0 > kScoreDepth ? e0 + kScoreDepth : a.d;
    for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t) {
      constexpr int RB = decltype(block)::kRows;
      if (e0 == 0) {
        prefetch.block();
        score_rows<T, RB, false>(a, r, e0, e1, e1 == a.d, width);
      } else {
        score_rows<T, RB, true>(a, r, e0, e1, e1 == a.d, width);
      }
    });
    e0 = e1;
  } while (e0 < a.d);
  int v_nonfinite = -1;
  for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t b) {
    constexpr int RB = decltype(block)::kRows;
    some_zero[b] = score_epilogue<T, RB>(a, r);
    // Rows that give a non-finite V row of their tile a weight of 0 skip it (whole rows).
    if (some_zero[b]) {
      if (v_nonfinite < 0) v_nonfinite = tile_v_has_nonfinite<T, Elem::Compute>(a);
      if (v_nonfinite) pv_rows_skip_zero_weights<T, Elem::Compute>(a, r, r + RB);
    }
  });
  const bool skipped = v_nonfinite > 0;
  for (int64_t c0 = 0; c0 < a.dv; c0 += kValueWidth) {
    const int64_t c1 = a.dv - c0 > kValueWidth ? c0 + kValueWidth : a.dv;
    for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t b) {
      constexpr int RB = decltype(block)::kRows;
      if (skipped && some_zero[b]) return;
      pv_all<T, RB, Elem::Compute>(a, r, c0, c1);
    });
  }
}

// Keys as PackedT or Rows, values as Rows, both stored as the same Elem.
template <typename T>
void tile_step(const cpuattn::TileStep<T>& a) {
  if (a.key.form == cpuattn::KeyForm::PackedT && !a.additive_w && a.d + a.dv >= kPhasedMinDims) {
    tile_step_phased(a);
    return;
  }
  if constexpr (sizeof(T) == 4) {  // half K and V rows in place: decode on a half cache
    if (a.key.elem == Elem::F16) {
      tile_step_rows<T, Elem::F16>(a);
      return;
    }
    if (a.key.elem == Elem::Bf16) {
      tile_step_rows<T, Elem::Bf16>(a);
      return;
    }
    if (a.key.elem == Elem::I8) {
      tile_step_rows<T, Elem::I8>(a);
      return;
    }
  }
  if constexpr (CPUATTN_VEC_BYTES == 64) {  // 16 registers (AVX2) hold no 8 x 2 block
    if (narrow_tile(a)) {
      tile_step_narrow(a);
      return;
    }
  }
  tile_step_rows<T, Elem::Compute>(a);
}

#include "kernels/backward_step.inl"
#include "kernels/portable_set.inl"
