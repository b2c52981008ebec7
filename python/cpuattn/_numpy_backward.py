"""The NumPy backward: the executable specification of ``cpuattn.attention_backward``.

FlashAttention-2's backward (Dao 2023, arXiv 2307.08691, Algorithm 2), written to be read. The
weights are recomputed from the saved lse, ``P = exp(s - lse)``, one (key block, query block)
tile at a time, never as an Lq x Lk array::

    delta = rowsum(dO * O)                  once per row: O(Lq)
    dV   += P^T dO
    dP    = dO V^T
    dS    = P * (dP - delta)                softmax's backward, row by row
    dQ   += scale dS K
    dK   += scale dS^T Q

Key blocks run outside (their dK, dV stay in one small accumulator), query blocks inside (dQ
accumulates over key blocks in a float32 / float64 array of one kv head's query rows). Tiles
that no kept pair reaches under causal / window / kv_lengths are skipped whole, as in the
forward. Every sum runs in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import numpy as np

from ._numpy import _LOG_TINY, _exp, _score_mods, apply_mask, kept_pairs, key_bounds, key_span
from ._request import Request

# Keys and query positions per tile: each tile costs Python overhead, so fewer, bigger
# matmuls win; memory stays O(group * BLOCK_Q * BLOCK_K).
BLOCK_K = 256
BLOCK_Q = 128


def attention_backward(
    req: Request, dout: np.ndarray, out: np.ndarray, lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``attention(req)`` for upstream ``dout``, given its ``out`` and ``lse``.

    All arrays in canonical shape (``(*batch, H, L, D)``, lse ``(*batch, Hq, Lq)``); returns
    ``(dq, dk, dv)`` in the dtypes of q, k, v, each rounded once from the compute dtype.
    """
    dq = np.zeros(req.q.shape, req.q.dtype)
    dk = np.zeros(req.k.shape, req.k.dtype)  # keys no query keeps keep 0
    dv = np.zeros(req.v.shape, req.v.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for b in np.ndindex(*req.batch_shape):
            n_keys = req.lk if req.kv_lengths is None else int(req.kv_lengths[b])
            for hk in range(req.hkv):
                heads = slice(hk * req.group, (hk + 1) * req.group)
                _head_backward(req, b, hk, heads, n_keys, dout, out, lse, dq, dk, dv)
    return dq, dk, dv


def _head_backward(req: Request, b, hk: int, heads: slice, n_keys: int, dout, out, lse, dq, dk, dv):
    """One kv head and the query heads that read it (GQA: dK, dV sum over all of them)."""
    ct = req.dtype
    do = dout[b][heads].astype(ct, copy=False)  # (group, Lq, Dv)
    delta = np.einsum("gid,gid->gi", do, out[b][heads].astype(ct, copy=False))
    row_lse = lse[b][heads].astype(ct, copy=False)
    # A row that kept no key has lse -inf: shifting by +inf makes all its weights exp(-inf) = 0.
    row_lse = np.where(row_lse == -np.inf, ct.type(np.inf), row_lse)
    dq_acc = np.zeros((req.group, req.lq, req.d), ct)

    lo, hi = key_bounds(req, np.arange(req.lq), n_keys)
    first_key, last_key = key_span(req, np.arange(req.lq), n_keys)
    for j0 in range(first_key, last_key, BLOCK_K):
        cols = slice(j0, min(j0 + BLOCK_K, last_key))
        k = req.k[b][hk, cols].astype(ct, copy=False)
        v = req.v[b][hk, cols].astype(ct, copy=False)
        dk_acc = np.zeros(k.shape, ct)
        dv_acc = np.zeros(v.shape, ct)
        # Query rows whose band [lo, hi) meets this key block: contiguous, as lo and hi never
        # decrease; whole query blocks outside it are skipped (with global tokens, those
        # that keep no pair of the block).
        i_first = int(np.searchsorted(hi, cols.start, side="right"))
        i_last = int(np.searchsorted(lo, cols.stop, side="left"))
        if req.globals is not None:
            i_first, i_last = 0, req.lq
        for i0 in range(i_first - i_first % BLOCK_Q, i_last, BLOCK_Q):
            rows = slice(i0, min(i0 + BLOCK_Q, req.lq))
            keep = kept_pairs(
                req, np.arange(rows.start, rows.stop), np.arange(j0, cols.stop), n_keys
            )
            if not keep.any():
                continue
            q = req.q[b][heads, rows].astype(ct, copy=False) * req.scale  # as the forward
            p, raw = _recompute_weights(req, b, heads, rows, cols, n_keys, keep, q, k, row_lse)
            dv_acc += _sum_over_heads(p, do[:, rows])  # P^T dO
            dp = do[:, rows] @ v.T
            ds = p * (dp - delta[:, rows, None])
            if req.softcap:
                # d/dx c tanh(x / c) = 1 - tanh(x / c)^2, at the capped score's argument.
                ds *= 1 - np.tanh(raw / req.softcap) ** 2
            # Where P is 0 the gradient is 0, even if a pair not kept made dP or raw inf / NaN.
            ds = np.where(p != 0, ds, 0)
            dq_acc[:, rows] += _matmul(ds, k) * req.scale
            dk_acc += _sum_over_heads(ds, q)  # scale dS^T Q, q already scaled
        dk[b][hk, cols] = dk_acc  # rounded once, to k's dtype
        dv[b][hk, cols] = dv_acc
    dq[b][heads] = dq_acc


def _recompute_weights(req: Request, b, heads, rows, cols, n_keys, keep, q, k, row_lse):
    """``(P, raw)`` of one tile: the forward's weights ``exp(s - lse)`` (0 for pairs not
    kept: ``keep``, the tile's kept_pairs) and the unmodified scores ``scale <q, k>`` that
    softcap's derivative needs."""
    positions = np.arange(rows.start, rows.stop)
    keys = np.arange(cols.start, cols.stop)
    raw = q @ k.T  # (group, r, c)
    s = _score_mods(req, raw, b, heads, positions, keys, n_keys)
    if req.mask is not None:
        s, keep = apply_mask(s, keep, req.mask[b][heads, rows, cols])
    p = _exp(s - row_lse[:, rows, None], _LOG_TINY[req.dtype])
    return np.where(keep, p, 0), raw


def _sum_over_heads(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_g a[g]^T b[g]`` as one matmul: (group, r, c), (group, r, n) -> (c, n)."""
    n = a.shape[0] * a.shape[1]  # not -1: a head dim of 0 leaves it undetermined
    return _matmul(a.reshape(n, a.shape[-1]).T, b.reshape(n, b.shape[-1]))


def _matmul(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w @ x``, except that a weight of exactly 0 ignores its row of ``x`` even if inf or
    NaN (IEEE's 0 * inf is NaN): a query and a key that are not kept exchange nothing, as in
    the forward. A non-finite ``x`` met by a non-zero weight makes that result NaN."""
    finite = np.isfinite(x)
    if finite.all():
        return w @ x
    out = w @ np.where(finite, x, 0)
    reached = (w != 0).astype(w.dtype) @ (~finite).astype(w.dtype) > 0
    out[reached] = np.nan
    return out
