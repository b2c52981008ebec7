"""Dense float64 reference attention, written straight from the contract (DESIGN §1).

Deliberately unlike both backends: no tiling, no online softmax, K/V repeated for GQA,
every keep-condition spelled out as a full (*batch, Hq, Lq, Lk) boolean array.
"""

import numpy as np


def dense_attention(
    q,
    k,
    v,
    *,
    mask=None,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    softcap=None,
    alibi_slopes=None,
    diagonal=None,
    global_tokens=None,
):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    squeeze = q.ndim == 2
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    batch = q.shape[:-3]
    hq, lq, d = q.shape[-3:]
    hkv, lk = k.shape[-3:-1]
    group = hq // hkv
    k = np.repeat(k, group, axis=-3)
    v = np.repeat(v, group, axis=-3)
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d else 1.0

    s = scale * (q @ np.swapaxes(k, -1, -2))
    n_keys = np.broadcast_to(lk if kv_lengths is None else np.asarray(kv_lengths), batch)
    n_keys = n_keys.reshape(*batch, 1, 1, 1).astype(np.int64)
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    off = 0 if causal == "top_left" else n_keys - lq
    if diagonal is not None:  # query i sits at key i + diagonal
        off = np.full_like(n_keys, diagonal)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, np.float64), (*batch, hq))
        s = s - slopes[..., None, None] * np.abs(i + off - j)
    keep = np.broadcast_to(j < n_keys, (*batch, hq, lq, lk))
    if causal:
        keep = keep & (j <= i + off)
    if window is not None:
        left, right = window
        in_window = np.ones_like(keep)
        if left >= 0:
            in_window = in_window & (j >= i + off - left)
        if right >= 0:
            in_window = in_window & (j <= i + off + right)
        if global_tokens is not None:  # hybrid: global keys, and every key for global queries
            g = np.asarray(global_tokens)
            g = np.arange(g) if g.ndim == 0 else g
            in_window = in_window | np.isin(j, g) | np.isin(i + off, g)
        keep = keep & in_window
    if mask is not None:
        mask = np.asarray(mask)
        if squeeze:
            mask = mask[None] if mask.ndim == 2 else mask
        if mask.dtype == np.bool_:
            keep = keep & mask
        else:
            s = s + mask.astype(np.float64)
    s = np.where(keep, s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, p / np.where(denom > 0, denom, 1), 0.0) @ v
        lse = np.where(denom > 0, np.log(np.where(denom > 0, denom, 1)) + m, -np.inf)[..., 0]
    if squeeze:
        out, lse = out[0], lse[0]
    return out, lse


def tolerance(dtype):
    """Max abs error allowed, relative to max |expected output| (the issue's bound)."""
    return {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}[np.dtype(dtype)]


def assert_matches(actual, expected, dtype, what="out"):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not np.isnan(actual).any(), f"{what}: NaN in result"
    inf = np.isinf(expected)
    assert np.array_equal(np.isinf(actual), inf), f"{what}: infinities differ"
    assert np.array_equal(actual[inf], expected[inf]), f"{what}: infinities differ in sign"
    finite = ~inf
    if not finite.any():
        return
    # out: relative to max |out| (the bound). lse is a log: its error scales with
    # max(|lse|, 1), so an lse near 0 is not held to a relative bound near 0.
    floor = 1.0 if what == "lse" else np.finfo(np.float64).tiny
    scale = max(float(np.abs(expected[finite]).max()), floor)
    err = float(np.abs(actual[finite] - expected[finite]).max())
    assert err <= tolerance(dtype) * scale, (
        f"{what}: max abs error {err:.3g} > {tolerance(dtype):.0e} x max|expected| {scale:.3g}"
    )


def random_qkv(rng, batch, hq, hkv, lq, lk, d, dv=None, dtype=np.float32):
    dv = d if dv is None else dv
    q = rng.standard_normal((*batch, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((*batch, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((*batch, hkv, lk, dv)).astype(dtype)
    return q, k, v


def check(attention, q, k, v, dtype=np.float32, **kw):
    """attention(...) (with lse) against dense_attention: out and lse within tolerance."""
    out, lse = attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, **kw)
    assert_matches(out, ref_out, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")
    return out, lse


def assert_close(actual, expected, bound, what):
    """Same shape, no NaN, the same infinities, finite entries within `bound`."""
    actual, expected = (
        np.asarray(actual).astype(np.float64),
        np.asarray(expected).astype(np.float64),
    )
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert not np.isnan(actual).any(), f"{what}: NaN in result"
    inf = np.isinf(expected)
    assert np.array_equal(actual[inf], expected[inf]), f"{what}: infinities differ"
    assert np.isfinite(actual[~inf]).all(), f"{what}: infinite where expected is finite"
    err = float(np.abs(actual[~inf] - expected[~inf]).max(initial=0))
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def per_head_options(rng, kw, batch, hq):
    """kw with its "alibi_slopes" / "sinks" placeholders ("heads": shape (Hq,), else (B, Hq))
    replaced by random values: slopes in [0.05, 0.5), sink logits around 0."""
    kw = dict(kw)
    for name in ("alibi_slopes", "sinks"):
        if name in kw:
            shape = (hq,) if kw[name] == "heads" else (batch, hq)
            slopes = name == "alibi_slopes"
            kw[name] = rng.uniform(0.05, 0.5, shape) if slopes else rng.standard_normal(shape) * 2
    return kw
