"""Attention sinks as learned logits (``sinks=``, gpt-oss): one logit per head in the softmax's
denominator only. Both backends against a dense float64 reference, lse, rows with no key,
split-KV decode, the backward (the sink enters through lse), and bad input."""

import numpy as np
import pytest
from reference import random_qkv

import cpuattn


def dense_with_sinks(q, k, v, sinks, keep, scale=None):
    """out and lse of softmax over the kept keys plus one sink logit per head, in float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[-3] // k.shape[-3]
    k, v = (np.repeat(x, group, axis=-3) for x in (k, v))
    s = q @ k.swapaxes(-1, -2) * (scale or q.shape[-1] ** -0.5)
    s = np.where(keep, s, -np.inf)
    sink = np.broadcast_to(np.asarray(sinks, np.float64), s.shape[:-2])[..., None, None]
    top = np.maximum(s.max(-1, keepdims=True, initial=-np.inf), sink)
    e = np.exp(s - top)
    denominator = e.sum(-1, keepdims=True) + np.exp(sink - top)
    return (e @ v) / denominator, (top + np.log(denominator))[..., 0]


def causal_keep(lq, lk, lengths=None, window=None):
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    n = np.asarray(lk if lengths is None else lengths).reshape(-1, 1, 1, 1)
    diag = i + n - lq
    keep = (j <= diag) & (j < n)
    if window is not None:
        keep &= j >= diag - window[0]
    return keep


@pytest.mark.parametrize("backend", ["numpy", "native"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "case", ["prefill", "decode_split_kv", "lengths_with_zero", "window", "per_batch_sinks"]
)
def test_matches_dense_reference(backend, dtype, case):
    if backend == "native" and not cpuattn.info()["native"]:
        pytest.skip("no native extension")
    rng = np.random.default_rng(0)
    shapes = {"decode_split_kv": (1, 1, 3000)}  # (batch, Lq, Lk): few items -> split-KV
    b, lq, lk = shapes.get(case, (2, 70, 90))
    q, k, v = random_qkv(rng, (b,), 8, 2, lq, lk, 16, dtype=dtype)
    sinks = rng.standard_normal(8) * 2
    options: dict = {"causal": True}
    lengths = window = None
    if case == "lengths_with_zero":
        lengths = np.array([0, 50])
        options["kv_lengths"] = lengths
    elif case == "window":
        window = (10, 0)
        options["window"] = window
    elif case == "per_batch_sinks":
        sinks = rng.standard_normal((b, 8))
    out, lse = cpuattn.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend, **options)
    keep = causal_keep(lq, lk, lengths, window)
    expected_out, expected_lse = dense_with_sinks(q, k, v, sinks, keep)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(lse, expected_lse, rtol=tol, atol=tol)
    if case == "lengths_with_zero":  # no key: out 0, lse = the sink
        assert np.all(out[0] == 0)
        np.testing.assert_allclose(lse[0], np.broadcast_to(sinks[:, None], (8, lq)), rtol=tol)


def test_huge_sinks_and_scores_stay_finite():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, (1,), 2, 2, 10, 12, 8, dtype=np.float32)
    for sinks in ([300.0, -300.0], [-300.0, 300.0]):
        for backend in ("numpy", "native"):
            out, lse = cpuattn.attention(
                q * 50, k, v, sinks=np.array(sinks), return_lse=True, backend=backend
            )
            assert np.isfinite(out).all()
            assert np.isfinite(lse).all()
        big = int(np.argmax(sinks))
        assert np.abs(out[0, big]).max() < 1e-30  # the sink takes every weight


@pytest.mark.parametrize("backend", ["numpy", "native"])
def test_backward_through_lse(backend):
    """With the forward's lse (which includes the sinks) the gradients are those of the
    sink-softmax: checked by finite differences in float64."""
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, (2,), 4, 2, 5, 7, 3, dtype=np.float64)
    sinks = rng.standard_normal(4)
    options = {"causal": True, "sinks": sinks}
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape)
    grads = cpuattn.attention_backward(dout, q, k, v, out, lse, backend=backend, **options)

    def loss(*x):
        return float(np.sum(cpuattn.attention(*x, **options) * dout))

    h = 1e-6
    for which, (x, g) in enumerate(zip((q, k, v), grads, strict=True)):
        expected = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            args = [a.copy() for a in (q, k, v)]
            args[which][idx] += h
            up = loss(*args)
            args[which][idx] -= 2 * h
            expected[idx] = (up - loss(*args)) / (2 * h)
        np.testing.assert_allclose(g, expected, rtol=0, atol=1e-7)


def test_bad_sinks_name_the_argument():
    q = np.zeros((2, 4, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"^sinks: expected shape \(Hq,\) or \(\*batch, Hq\)"):
        cpuattn.attention(q, q, q, sinks=np.zeros(3))
    with pytest.raises(ValueError, match="^sinks: expected finite values"):
        cpuattn.attention(q, q, q, sinks=np.array([0, np.inf, 0, 0]))
    with pytest.raises(TypeError, match="^sinks: expected real numbers"):
        cpuattn.attention(q, q, q, sinks=np.array(["a"] * 4))


@pytest.mark.parametrize("backend", ["numpy", "native"])
def test_varlen_sequences_each_with_the_sinks(backend):
    rng = np.random.default_rng(4)
    lengths = [5, 0, 40, 3]
    cu = np.cumsum([0, *lengths])
    q, k, v = (rng.standard_normal((cu[-1], h, 8)) for h in (4, 2, 2))
    sinks = rng.standard_normal(4)
    out, lse = cpuattn.attention_varlen(
        q, k, v, cu, cu, causal=True, sinks=sinks, return_lse=True, backend=backend
    )
    for b in range(4):
        rows = slice(cu[b], cu[b + 1])
        parts = [x[rows].swapaxes(0, 1) for x in (q, k, v)]
        expected, expected_lse = cpuattn.attention(
            *parts, causal=True, sinks=sinks, return_lse=True, backend="numpy"
        )
        np.testing.assert_allclose(out[rows].swapaxes(0, 1), expected, atol=1e-12)
        np.testing.assert_allclose(lse[:, rows], expected_lse, atol=1e-12)
