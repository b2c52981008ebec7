"""float16 / bfloat16 inputs, computed in float32 (docs/guide/half_precision.rst and
attention's docstring).

Errors are measured against a float64 computation on the same rounded inputs, relative to
max |v|: the bounds the docstring states (2e-3 float16, 1e-2 bfloat16 output; float32
accuracy with out_dtype=float32).
"""

import functools

import numpy as np
import pytest
from reference import assert_matches, dense_attention

import cpuattn
from cpuattn._request import BF16

HALVES = [np.dtype(np.float16), BF16]
BOUND = {np.dtype(np.float16): 2e-3, BF16: 1e-2}


def rounded_inputs(rng, dtype, batch, hq, hkv, lq, lk, d):
    return tuple(
        rng.standard_normal(shape).astype(dtype)
        for shape in ((*batch, hq, lq, d), (*batch, hkv, lk, d), (*batch, hkv, lk, d))
    )


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize(
    ("lq", "lk", "kw"),
    [
        (1, 7, {}),
        (129, 129, {"causal": True}),
        (40, 300, {"window": (50, 0), "causal": True}),
        (3, 2000, {"kv_lengths": np.array([2000, 999])}),
    ],
    ids=["tiny", "causal", "window", "decode"],
)
def test_half_matches_float64_within_bound(attention, rng, dtype, lq, lk, kw):
    q, k, v = rounded_inputs(rng, dtype, (2,), 4, 2, lq, lk, 40)
    ref_out, ref_lse = dense_attention(q, k, v, **kw)
    out, lse = attention(q, k, v, return_lse=True, **kw)
    assert out.dtype == dtype
    assert lse.dtype == np.float32
    scale = float(np.abs(v.astype(np.float64)).max())
    assert np.abs(out.astype(np.float64) - ref_out).max() <= BOUND[dtype] * scale
    assert_matches(lse, ref_lse, np.float32, "lse")
    out32 = attention(q, k, v, out_dtype=np.float32, **kw)  # unrounded: float32 accuracy
    assert out32.dtype == np.float32
    assert_matches(out32, ref_out, np.float32)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_float32_queries_on_a_half_kv_cache(attention, rng, dtype):
    q = rng.standard_normal((1, 8, 4, 64)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 3000, 64)).astype(dtype) for _ in range(2))
    out = attention(q, k, v, causal=True)
    assert out.dtype == np.float32
    assert_matches(out, dense_attention(q, k, v, causal=True)[0], np.float32)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_half_masks(attention, rng, dtype):
    q, k, v = rounded_inputs(rng, np.float32, (), 2, 2, 30, 50, 16)
    bias = np.where(rng.random((30, 50)) > 0.3, rng.standard_normal((30, 50)), -np.inf)
    mask = bias.astype(dtype)
    out = attention(q, k, v, mask=mask)
    assert_matches(out, dense_attention(q, k, v, mask=mask.astype(np.float64))[0], np.float32)


@functools.lru_cache(maxsize=1)
def long_float16_case():
    q, k, v = rounded_inputs(np.random.default_rng(5), np.float16, (), 2, 2, 4096, 4096, 64)
    return q, k, v, cpuattn.attention(*(x.astype(np.float64) for x in (q, k, v)), backend="numpy")


def test_long_float16_sequence_error_bound(native):
    q, k, v, ref = long_float16_case()
    out = native(q, k, v)
    assert np.abs(out.astype(np.float64) - ref).max() <= 2e-3 * np.abs(v.astype(float)).max()


def test_half_out_buffer_and_nonfinite(attention, rng):
    q, k, v = rounded_inputs(rng, BF16, (), 2, 1, 20, 70, 8)
    k[0, 33] = np.nan  # a dropped key may hold anything
    mask = np.ones((20, 70), bool)
    mask[:, 33] = False
    out = np.empty((2, 20, 8), BF16)
    assert attention(q, k, v, mask=mask, out=out) is out
    assert np.isfinite(out.astype(np.float32)).all()


def test_kv_cache_in_half(rng):
    cache = cpuattn.KVCache(1, 2, 64, 16, dtype=np.float16)
    k, v = (rng.standard_normal((1, 2, 5, 16)).astype(np.float16) for _ in range(2))
    cache.append(k, v)
    q = rng.standard_normal((1, 4, 5, 16)).astype(np.float32)
    out = cpuattn.attention(q, cache.k, cache.v, kv_lengths=cache.lengths, causal=True)
    assert_matches(out, dense_attention(q, k, v, causal=True)[0], np.float32)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_every_half_value_converts_exactly(attention, dtype):
    """One key of weight 1: out is V itself, so all 65 536 bit patterns (subnormals, +-inf,
    NaN) must come out as NumPy / ml_dtypes convert them to float32 (the sign of a zero or
    NaN is not kept: the sum starts at +0)."""
    v = np.arange(2**16, dtype=np.uint16).view(dtype).reshape(1, 1, 2**16)
    q = np.ones((1, 1, 4), dtype)
    k = np.ones((1, 1, 4), dtype)
    out = attention(q, k, v, out_dtype=np.float32)
    expected = v.astype(np.float32)
    assert np.array_equal(out, expected, equal_nan=True)
    signed = (expected != 0) & ~np.isnan(expected)
    assert np.array_equal(np.signbit(out[signed]), np.signbit(expected[signed]))
