// FlashAttention-2's backward on one (query tile x key tile) pair (Dao 2023, arXiv
// 2307.08691, Algorithm 2), built from the forward's pieces: score_rows for the two products
// into a score-shaped tile (S = q K^T, dP = dO V^T), the score epilogue's softcap, ALiBi, mask
// and bounds, and pv_columns for the three accumulating products (dV, dK, dQ). Part of
// tile_step.inl (its namespaces and linkage rules).
#ifndef CPUATTN_VEC_BYTES
#error "included by kernels/tile_step.inl only"
#endif

static_assert(cpuattn::kTileRows <= cpuattn::kTileKeys,
              "P^T and dS^T read a score tile's columns as rows: as many keys as query rows");

// o[0, out_rows) += weights . (a.value rows), the weights a.s[row, 0 : a.cols] (or, with
// kTransposed, a.s[0 : a.cols, row]): the forward's P.V product with other operands.
// skip_zero: a weight of 0 ignores its value row (which may hold inf or NaN).
template <bool kTransposed, typename T>
inline void accumulate_product(const cpuattn::TileStep<T>& a, int64_t out_rows, bool skip_zero) {
  if (skip_zero) {
    pv_rows_skip_zero_weights<T, Elem::Compute, kTransposed>(a, 0, out_rows);
    return;
  }
  for_row_blocks(out_rows, [&](auto block, int64_t r, int64_t) {
    pv_columns<T, decltype(block)::kRows, Elem::Compute, false, kTransposed>(a, r, 0, a.dv);
  });
}

// s[rows x kTileKeys] = a.q . (a.key's packed transpose), over a.d.
template <typename T>
inline void product_tile(const cpuattn::TileStep<T>& a) {
  for_row_blocks(a.rows, [&](auto block, int64_t r, int64_t) {
    score_rows<T, decltype(block)::kRows>(a, r, 0, a.d, true, cpuattn::kTileKeys);
  });
}

// The forward's weights of the pair from its scores S in b.scores.s (kBareProducts: q . K^T,
// not yet times dot_scale, as the tile unit stores them): P = exp(S - lse), in place; with
// softcap, its derivative 1 - tanh^2 = 1 - (capped / cap)^2 into b.cap_grad.
template <typename T, bool kBareProducts = false>
inline void weights_from_scores(const cpuattn::BackwardStep<T>& b) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const cpuattn::TileStep<T>& a = b.scores;
  if constexpr (kBareProducts) {
    const V scale = S::splat(a.dot_scale);
    for (int64_t i = 0; i < a.rows * W; i += L) S::store(a.s + i, S::load(a.s + i) * scale);
  }
  if (a.softcap > 0) {
    cap_scores<T, false>(a, 0, a.rows, W);
    const T inverse_cap = T(1) / a.softcap;
    for (int64_t r = 0; r < a.rows; ++r) {
      for (int64_t c = 0; c < W; c += L) {
        const V t = S::load(a.s + r * W + c) * inverse_cap;
        S::store(b.cap_grad + r * W + c, T(1) - t * t);
      }
    }
  }
  if (a.slopes) add_alibi(a, 0, a.rows, W);
  mask_rows(a, 0, a.rows, W);  // dropped pairs and columns past cols: -inf, so P = 0
  for (int64_t r = 0; r < a.rows; ++r) {
    const V shift = S::splat(b.lse[r]);
    for (int64_t c = 0; c < W; c += L) {
      S::store(a.s + r * W + c, fast_exp_vec<T>(S::load(a.s + r * W + c) - shift));
    }
  }
}

// dS = P (dP - delta) (times softcap's derivative) over b.dp, 0 wherever P is 0 (so a dropped
// pair whose dP is inf or NaN gives nothing).
template <typename T>
inline void softmax_gradient(const cpuattn::BackwardStep<T>& b) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t W = cpuattn::kTileKeys, L = S::kLanes;
  const cpuattn::TileStep<T>& a = b.scores;
  const bool cap = a.softcap > 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    const V delta = S::splat(b.delta[r]);
    for (int64_t c = 0; c < W; c += L) {
      const V p = S::load(a.s + r * W + c);
      V ds = p * (S::load(b.dp + r * W + c) - delta);
      if (cap) ds *= S::load(b.cap_grad + r * W + c);
      S::store(b.dp + r * W + c, p == V{} ? V{} : ds);
    }
  }
}

template <typename T>
void backward_step(const cpuattn::BackwardStep<T>& b) {
  const cpuattn::TileStep<T>& a = b.scores;
  product_tile(a);
  weights_from_scores(b);

  cpuattn::TileStep<T> dp = a;  // dP = dO V^T: a score product with dO for q, V^T for K^T
  dp.q = b.dout;
  dp.q_ld = b.dout_ld;
  dp.q_unscaled = false;
  dp.key.data = b.vt;
  dp.d = a.dv;
  dp.s = b.dp;
  product_tile(dp);
  softmax_gradient(b);

  cpuattn::TileStep<T> sum{};  // the accumulating products, rows of weights times value rows
  sum.value.form = cpuattn::ValueForm::Rows;
  sum.value.elem = Elem::Compute;
  // dV[keys] += P^T dO
  sum.s = a.s;
  sum.cols = a.rows;
  sum.value.data = b.dout;
  sum.value.ld = b.dout_ld;
  sum.o = b.dv;
  sum.dv = a.dv;
  accumulate_product<true>(sum, a.cols, b.rows_nonfinite);
  // dK[keys] += dS^T q (times the scale: in q staged, else by the driver)
  sum.s = b.dp;
  sum.value.data = a.q;
  sum.value.ld = a.q_ld;
  sum.o = b.dk;
  sum.dv = a.d;
  accumulate_product<true>(sum, a.cols, b.rows_nonfinite);
  // dQ[rows] += dS K
  sum.cols = a.cols;
  sum.value.data = b.k;
  sum.value.ld = b.k_ld;
  sum.o = b.dq;
  accumulate_product<false>(sum, a.rows, b.keys_nonfinite);
}
