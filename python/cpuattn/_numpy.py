"""The NumPy backend: the executable specification of ``cpuattn.attention``.

Same algorithm as the native kernel, written to be read: for every (batch entry, kv head,
block of query positions) it walks the keys that block may see, one key block at a time, and
keeps a running softmax (online softmax: Milakov & Gimelshein 2018, FlashAttention-2,
arXiv 2307.08691). Memory is O(block), never O(Lq x Lk). All query heads that share a kv head
are computed together, so GQA/MQA never copies K or V.
"""

from __future__ import annotations

import numpy as np

from ._request import Request

# Query positions and keys per block. Larger than the native tiles: here each block costs
# Python overhead, so fewer, bigger matmuls win; memory stays O(group * BLOCK_Q * BLOCK_K).
BLOCK_Q = 128
BLOCK_K = 512

# exp(x) below the smallest normal number is taken as exactly 0, as the native kernels do, so
# both backends agree on which weights are 0 (and so which keys can reach a row; see NaN below).
# The threshold is log(smallest normal) rounded to the dtype, compared in the dtype.
_LOG_TINY = {np.dtype(t): t(np.log(np.finfo(t).tiny)) for t in (np.float32, np.float64)}


def key_rows(req: Request, b, hk: int, j0: int, j1: int) -> np.ndarray:
    """Keys [j0, j1) of kv head hk in the compute dtype: half upcast, int8 times its scales."""
    return _rows(req.k, req.k_scale, req.dtype, b, hk, j0, j1)


def value_rows(req: Request, b, hk: int, j0: int, j1: int) -> np.ndarray:
    return _rows(req.v, req.v_scale, req.dtype, b, hk, j0, j1)


def _rows(x, scale, dtype, b, hk, j0, j1) -> np.ndarray:
    rows = x[b][hk, j0:j1].astype(dtype, copy=False)
    return rows if scale is None else rows * scale[b][hk, j0:j1, None]


def attention(req: Request) -> tuple[np.ndarray, np.ndarray | None]:
    out = req.out if req.out is not None else np.empty(req.out_shape, req.out_dtype)
    lse = np.empty(req.lse_shape, req.dtype) if req.return_lse else None
    g = req.group
    # NaN / inf in the inputs reach only the rows that give their key a weight, silently (as in
    # the native path): weights of exactly 0 never multiply V or the old state.
    with np.errstate(invalid="ignore", over="ignore"):
        _attend_all(req, out, lse, g)
    return out, lse


def _attend_all(req: Request, out: np.ndarray, lse: np.ndarray | None, g: int) -> None:
    for b in np.ndindex(*req.batch_shape):
        n_keys = req.lk if req.kv_lengths is None else int(req.kv_lengths[b])
        for hk in range(req.hkv):
            heads = slice(hk * g, (hk + 1) * g)
            for i0 in range(0, req.lq, BLOCK_Q):
                rows = slice(i0, min(i0 + BLOCK_Q, req.lq))
                block_out, block_lse = _attend_block(req, b, hk, heads, rows, n_keys)
                out[b][heads, rows] = block_out
                if lse is not None:
                    lse[b][heads, rows] = block_lse


def key_bounds(req: Request, positions: np.ndarray, n_keys: int):
    """Half-open key range [lo, hi) each query position keeps under causal / window / length
    (its band: global tokens add keys outside it, :func:`kept_pairs`).

    The diagonal of position i is key ``i + off`` (``Request.offset``): ``off = n_keys - Lq``
    when aligned bottom-right (the last query sees the last valid key), ``0`` when aligned
    top-left, or the caller's ``diagonal``. Both ends are non-decreasing in i.
    """
    diag = positions + req.offset(n_keys)
    left, right = req.window
    lo = np.zeros_like(positions)
    hi = np.full_like(positions, n_keys)
    if left >= 0:
        lo = np.maximum(lo, diag - left)
    if req.causal:
        hi = np.minimum(hi, diag + 1)
    if right >= 0:
        hi = np.minimum(hi, diag + right + 1)
    lo = np.minimum(lo, n_keys)  # an empty range must not point past the valid keys
    return lo, np.maximum(lo, hi)


def key_caps(req: Request, positions: np.ndarray, n_keys: int) -> np.ndarray:
    """The keys below this are the ones each position keeps without its window (causal,
    kv_lengths); non-decreasing."""
    if not req.causal:
        return np.full_like(positions, n_keys)
    return np.clip(positions + req.offset(n_keys) + 1, 0, n_keys)


def kept_pairs(req: Request, positions: np.ndarray, keys: np.ndarray, n_keys: int) -> np.ndarray:
    """``(positions, keys)`` bool: the pairs causal / window / kv_lengths / global tokens keep
    (a user mask comes on top). With global tokens a pair the window drops is kept when below
    the row's cap and its key, or the query's own position, is global."""
    lo, hi = key_bounds(req, positions, n_keys)
    keep = (keys >= lo[:, None]) & (keys < hi[:, None])
    if req.globals is None:
        return keep
    below = keys < key_caps(req, positions, n_keys)[:, None]
    global_key = np.isin(keys, req.globals)[None, :]
    global_row = np.isin(positions + req.offset(n_keys), req.globals)[:, None]
    return keep | (below & (global_key | global_row))


def key_span(req: Request, positions: np.ndarray, n_keys: int) -> tuple[int, int]:
    """The keys [start, stop) some of the (sorted) positions may keep: the window's band, or
    with global tokens every key below the last position's cap."""
    if positions.size == 0:
        return 0, 0
    lo, hi = key_bounds(req, positions, n_keys)
    if req.globals is None:
        return int(lo[0]), int(hi[-1])
    return 0, max(int(hi[-1]), int(key_caps(req, positions[-1:], n_keys)[0]))


def _attend_block(req: Request, b, hk: int, heads: slice, rows: slice, n_keys: int):
    q = req.q[b][heads, rows].astype(req.dtype, copy=False) * req.scale  # (group, r, D)
    positions = np.arange(rows.start, rows.stop)

    neg_inf = req.dtype.type(-np.inf)
    m = np.full(q.shape[:-1], neg_inf, req.dtype)  # running max of kept scores
    l = np.zeros(q.shape[:-1], req.dtype)  # running sum of exp(score - m)
    o = np.zeros((*q.shape[:-1], req.dv), req.dtype)  # running unnormalized output

    log_tiny = _LOG_TINY[req.dtype]
    # Keys outside the span are seen by no row of this block: never touched; nor are blocks
    # inside it that no row keeps (between a window and global tokens).
    start, stop = key_span(req, positions, n_keys)
    for j0 in range(start, stop, BLOCK_K):
        j1 = min(j0 + BLOCK_K, stop)
        keys = np.arange(j0, j1)
        keep = kept_pairs(req, positions, keys, n_keys)  # (r, c), same for each head
        if not keep.any():
            continue
        k = key_rows(req, b, hk, j0, j1)
        v = value_rows(req, b, hk, j0, j1)
        s = q @ k.T if req.additive_w is None else _additive_scores(q, k, req.additive_w)
        s = _score_mods(req, s, b, heads, positions, keys, n_keys)
        if req.mask is not None:
            s, keep = apply_mask(s, keep, req.mask[b][heads, rows, j0:j1])
        s = np.where(keep, s, neg_inf)

        m_new = np.maximum(m, s.max(axis=-1))
        shift = np.where(m_new == neg_inf, 0, m_new)  # rows that kept nothing so far
        alpha = _exp(m - shift, log_tiny)  # rescales the old state; 0 before the first key
        p = _exp(s - shift[..., None], log_tiny)
        l = l * alpha + p.sum(axis=-1)
        o *= alpha[..., None]
        o[alpha == 0] = 0  # drops the old state outright: 0 * inf must not become NaN
        o += _weighted_values(p, v)
        m = m_new

    # A row that kept no key: output 0, lse -inf (never 0/0).
    empty = l == 0
    safe_l = np.where(empty, 1, l)
    lse = np.where(empty, neg_inf, m + np.log(safe_l))
    if req.sinks is None:
        return o / safe_l[..., None], lse
    # A sink logit joins the denominator only: lse' = log(e^lse + e^sink), and the weights of
    # the keys shrink by e^(lse - lse') (a row with no key: out 0, lse' = sink).
    total = np.logaddexp(lse, req.sinks[b][heads][:, None])
    return o / safe_l[..., None] * np.exp(lse - total)[..., None], total


def apply_mask(s, keep, mask):
    """A user mask on a block: bool narrows ``keep``; a float one is added to the scores, and
    its -inf drops the key outright, so even a NaN score of that key never reaches the row."""
    if mask.dtype == np.bool_:
        return s, keep & mask
    return s + mask, keep & (mask != -np.inf)


def _additive_scores(q, k, w):
    """sum_d w[d] tanh(q[..., i, d] + k[j, d]), one d at a time: O(rows x keys) memory."""
    s = np.zeros((*q.shape[:-1], k.shape[0]), q.dtype)
    for e in range(q.shape[-1]):
        s += w[e] * np.tanh(q[..., e, None] + k[:, e])
    return s


def _score_mods(req: Request, s, b, heads: slice, positions, keys, n_keys: int):
    """Softcap, then ALiBi, on the scaled scores of one block (before any mask)."""
    if req.softcap:
        s = req.softcap * np.tanh(s / req.softcap)
    if req.alibi is not None:
        diag = positions + req.offset(n_keys)
        distance = np.abs(diag[:, None] - keys[None, :]).astype(req.dtype)  # (r, c)
        s = s - req.alibi[b][heads][:, None, None] * distance
    return s


def _exp(x: np.ndarray, log_tiny: np.floating) -> np.ndarray:
    p = np.exp(x)
    p[x < log_tiny] = 0
    return p


def _weighted_values(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``p @ v``, except that a weight of exactly 0 ignores its V row even if inf or NaN.

    With finite V (the usual case) this is one matmul. Otherwise the finite part is a matmul
    and each non-finite V element is added as IEEE arithmetic would for the rows that give its
    key a positive weight: +inf, -inf, or NaN when both signs or a NaN meet.
    """
    finite = np.isfinite(v)
    if finite.all():
        return p @ v
    out = p @ np.where(finite, v, 0)
    weighted = (p > 0).astype(p.dtype)  # (..., rows, keys)
    hits_nan = weighted @ np.isnan(v).astype(p.dtype) > 0
    hits_pos = weighted @ (v == np.inf).astype(p.dtype) > 0
    hits_neg = weighted @ (v == -np.inf).astype(p.dtype) > 0
    out[hits_pos] = np.inf
    out[hits_neg] = -np.inf
    out[hits_nan | (hits_pos & hits_neg)] = np.nan
    return out
