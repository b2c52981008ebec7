// Portable body of the tile step, written as plain loops that the compiler vectorizes under
// each translation unit's ISA flags. Include it inside an anonymous namespace only: every
// ISA's copy must have internal linkage, or the linker may merge an AVX-512 copy into the
// scalar path. No std:: templates here for the same reason. The includer includes
// kernels/kernel.h first (it brings every standard header used here).
#include "exp.h"

template <typename T>
inline T mask_value(const cpuattn::TileStep<T>& a, int64_t r, int64_t c, T s) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t off = (a.j0 + c) * a.mask_col_stride;
  if (a.mask_kind == cpuattn::MaskKind::Bool) {
    const bool keep = static_cast<const uint8_t*>(a.mask_rows[r])[off] != 0;
    return keep ? s : kNegInf;
  }
  return s + static_cast<const T*>(a.mask_rows[r])[off];
}

// s[r, :] = q[r, :] . K^T over the whole padded tile width.
template <typename T>
inline void tile_scores(const cpuattn::TileStep<T>& a) {
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = 0; r < a.rows; ++r) {
    T acc[W] = {};
    const T* qr = a.q + r * a.d;
    for (int64_t e = 0; e < a.d; ++e) {
      const T qe = qr[e];
      const T* kr = a.kt + e * W;
      for (int64_t c = 0; c < W; ++c) acc[c] += qe * kr[c];
    }
    T* sr = a.s + r * W;
    for (int64_t c = 0; c < W; ++c) sr[c] = acc[c];
  }
}

template <typename T>
inline void tile_mask(const cpuattn::TileStep<T>& a) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = 0; r < a.rows; ++r) {
    T* sr = a.s + r * W;
    if (a.mask_kind != cpuattn::MaskKind::None) {
      for (int64_t c = 0; c < a.cols; ++c) sr[c] = mask_value(a, r, c, sr[c]);
    }
    if (a.apply_bounds) {
      const int64_t lo = a.bounds[r].lo - a.j0, hi = a.bounds[r].hi - a.j0;
      for (int64_t c = 0; c < a.cols; ++c) sr[c] = (c < lo || c >= hi) ? kNegInf : sr[c];
    }
  }
}

// Online softmax (Milakov & Gimelshein 2018; FlashAttention-2, arXiv 2307.08691) then O += P V.
template <typename T>
inline void tile_softmax_pv(const cpuattn::TileStep<T>& a) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr int64_t W = cpuattn::kTileKeys;
  for (int64_t r = 0; r < a.rows; ++r) {
    T* sr = a.s + r * W;
    T tile_max = kNegInf;
    for (int64_t c = 0; c < a.cols; ++c) {
      const T x = sr[c];
      tile_max = (x > tile_max || x != x) ? x : tile_max;  // NaN wins, so it propagates
    }
    if (tile_max == kNegInf) continue;  // nothing kept in this tile: row state unchanged
    const T m_old = a.m[r];
    const T m_new = (tile_max > m_old || tile_max != tile_max) ? tile_max : m_old;
    const T alpha = fast_exp(m_old - m_new);  // 0 on the row's first kept key
    T sum = 0;
    for (int64_t c = 0; c < a.cols; ++c) {
      const T p = fast_exp(sr[c] - m_new);
      sr[c] = p;
      sum += p;
    }
    a.m[r] = m_new;
    a.l[r] = a.l[r] * alpha + sum;
    T* o = a.o + r * a.dv;
    if (alpha != T(1)) {  // lazy rescale: only when the running max grew
      for (int64_t e = 0; e < a.dv; ++e) o[e] *= alpha;
    }
    for (int64_t c = 0; c < a.cols; ++c) {
      const T p = sr[c];
      if (p == T(0)) continue;  // masked key: its V row need not be read
      const T* vr = a.v + c * a.v_ld;
      for (int64_t e = 0; e < a.dv; ++e) o[e] += p * vr[e];
    }
  }
}

template <typename T>
void tile_step(const cpuattn::TileStep<T>& a) {
  tile_scores(a);
  tile_mask(a);
  tile_softmax_pv(a);
}
