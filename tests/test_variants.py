"""Score variants: softcap (Gemma-2) and ALiBi, on every backend and ISA, with every option."""

import numpy as np
import pytest
from reference import assert_matches, check, random_qkv

F32 = np.float32

OPTIONS = [
    {},
    {"causal": True},
    {"causal": "top_left"},
    {"window": (20, 3), "causal": True},
    {"kv_lengths": np.array([150, 61])},
    {"mask": "bool"},
    {"mask": "float"},
]


def materialize(rng, options, lq, lk):
    kw = dict(options)
    if kw.get("mask") == "bool":
        kw["mask"] = rng.random((lq, lk)) > 0.3
    elif kw.get("mask") == "float":
        kw["mask"] = np.where(rng.random((lq, lk)) > 0.2, rng.standard_normal((lq, lk)), -np.inf)
    return kw


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_softcap(attention, rng, options, dtype):
    q, k, v = random_qkv(rng, (2,), 4, 2, 70, 150, 24, dtype=dtype)
    q *= 4  # large logits, so the cap matters
    check(attention, q, k, v, dtype, softcap=5.0, **materialize(rng, options, 70, 150))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes(H)", "slopes(B,H)"])
def test_alibi(attention, rng, options, per_batch):
    q, k, v = random_qkv(rng, (2,), 4, 2, 70, 150, 24)
    slopes = 2.0 ** -np.arange(1, 5) if not per_batch else rng.random((2, 4))
    check(attention, q, k, v, alibi_slopes=slopes, **materialize(rng, options, 70, 150))


def test_softcap_and_alibi_together_decode(attention, rng):
    q, k, v = random_qkv(rng, (1,), 8, 2, 1, 3000, 64)  # split-KV path on the native side
    check(attention, q, k, v, softcap=30.0, alibi_slopes=2.0 ** -np.arange(1, 9), causal=True)


def test_softcap_is_tanh_at_the_extremes(attention):
    q = np.array([[1e4, 0.0], [-1e4, 0.0]], F32)  # scores +-1e4 / sqrt(2)
    k = np.array([[1.0, 0.0], [0.0, 1.0]], F32)
    v = np.array([[1.0, 0.0], [0.0, 1.0]], F32)
    out = attention(q, k, v, softcap=2.0)  # capped scores +-2 vs 0
    expected = np.exp([[2.0, 0.0], [-2.0, 0.0]])
    assert_matches(out, expected / expected.sum(1, keepdims=True), F32)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"softcap": 0.0}, ValueError, "softcap: expected a positive finite"),
        ({"softcap": -1.0}, ValueError, "softcap: expected a positive finite"),
        ({"softcap": float("inf")}, ValueError, "softcap: expected a positive finite"),
        ({"softcap": "3"}, TypeError, "softcap: expected a positive number"),
        ({"alibi_slopes": np.ones(3)}, ValueError, r"alibi_slopes: expected shape \(Hq,\) or"),
        ({"alibi_slopes": np.ones((3, 4))}, ValueError, r"alibi_slopes: expected shape"),
        (
            {"alibi_slopes": np.array([1, np.nan, 1, 1])},
            ValueError,
            "alibi_slopes: expected finite",
        ),
        ({"alibi_slopes": np.array(["a"] * 4)}, TypeError, "alibi_slopes: expected real numbers"),
    ],
)
def test_invalid(attention, rng, kw, exc, match):
    q, k, v = random_qkv(rng, (2,), 4, 2, 5, 7, 8)
    with pytest.raises(exc, match=match):
        attention(q, k, v, **kw)


def test_nan_score_stays_nan_through_softcap_and_alibi(attention, rng):
    q, k, v = random_qkv(rng, (), 2, 1, 6, 20, 8)
    k[0, 4] = np.nan  # every row keeps key 4
    for kw in ({"softcap": 5.0}, {"alibi_slopes": np.ones(2)}):
        out = attention(q, k, v, **kw)
        assert np.isnan(out).all()
