"""additive_attention (Bahdanau): every backend and ISA against a dense float64 reference."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention, random_qkv

import cpuattn

F32 = np.float32


def dense_additive(q, k, v, w, **kw):
    """Scores spelled out over the full (..., Lq, Lk, D) cube, then the dense reference's
    masking and softmax (fed through a float mask of those scores, with q = k = 0)."""
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    group = q.shape[-3] // k.shape[-3]
    k64 = np.repeat(k64, group, axis=-3)
    scores = (w * np.tanh(q64[..., :, None, :] + k64[..., None, :, :])).sum(-1)
    zeros_q = np.zeros(q.shape[:-1] + (1,))
    zeros_k = np.zeros(k.shape[:-1] + (1,))
    mask = kw.pop("mask", None)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    return dense_attention(zeros_q, zeros_k, v, mask=scores, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"window": (9, 0), "causal": "top_left"},
        {"kv_lengths": np.array([130, 17])},
        {"mask": "bool"},
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_matches_reference(attention, rng, kw, dtype):
    backend = attention.keywords["backend"]
    q, k, v = random_qkv(rng, (2,), 4, 2, 40, 130, 12, dtype=dtype)
    w = rng.standard_normal(12)
    kw = dict(kw)
    if kw.get("mask") == "bool":
        kw["mask"] = rng.random((40, 130)) > 0.3
    out, lse = cpuattn.additive_attention(q, k, v, w, return_lse=True, backend=backend, **kw)
    ref_out, ref_lse = dense_additive(q, k, v, w, **kw)
    assert_matches(out, ref_out, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")


def test_decode_shape_and_2d(attention, rng):
    backend = attention.keywords["backend"]
    q, k, v = random_qkv(rng, (), 1, 1, 3, 2000, 16)  # split-KV path on the native side
    w = rng.standard_normal(16)
    out = cpuattn.additive_attention(q[0], k[0], v[0], w, causal=True, backend=backend)
    assert_matches(out, dense_additive(q, k, v, w, causal=True)[0][0], F32)


def test_bad_w(rng):
    q, k, v = random_qkv(rng, (), 2, 2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"w: expected shape \(D,\) = \(8,\)"):
        cpuattn.additive_attention(q, k, v, np.ones(7))
    with pytest.raises(ValueError, match="w: expected finite"):
        cpuattn.additive_attention(q, k, v, np.full(8, np.inf))
    with pytest.raises(TypeError, match="w: expected an array"):
        cpuattn.additive_attention(q, k, v, None)
