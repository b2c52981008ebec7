"""Every backend (NumPy, and native per ISA) against the dense float64 reference."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention, random_qkv

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("lq", [1, 2, 7, 129, 1000])
@pytest.mark.parametrize("d", [8, 13, 64, 80, 128, 256])
def test_odd_sizes(attention, rng, dtype, lq, d):
    lk = {1: 1, 2: 7, 7: 129, 129: 1000, 1000: 2}[lq]  # Lq != Lk, both ways
    q, k, v = random_qkv(rng, (1,), 2, 1, lq, lk, d, dtype=dtype)
    out, lse = attention(q, k, v, return_lse=True)
    ref_out, ref_lse = dense_attention(q, k, v)
    assert out.dtype == dtype
    assert lse.dtype == dtype
    assert_matches(out, ref_out, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("hq", "hkv"),
    [(4, 4), (4, 2), (6, 2), (8, 1), (16, 2)],
    ids=["mha", "gqa2", "gqa3", "mqa8", "gqa8"],
)
@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=str)
def test_gqa(attention, rng, dtype, hq, hkv, causal):
    q, k, v = random_qkv(rng, (2,), hq, hkv, 37, 70, 16, dv=24, dtype=dtype)
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    ref_out, ref_lse = dense_attention(q, k, v, causal=causal)
    assert out.shape == (2, hq, 37, 24)
    assert_matches(out, ref_out, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")


def _layouts(rng, dtype):
    """(name, q, k, v) in memory layouts people actually pass."""
    b, h, l, d = 2, 4, 33, 16
    # (B, L, H, D) buffers viewed as (B, H, L, D): the usual projection output.
    blhd = [rng.standard_normal((b, l, h, d)).astype(dtype) for _ in range(3)]
    yield "swapaxes", *(x.swapaxes(1, 2) for x in blhd)
    # Every other element of the last axis: the last axis is not unit-stride.
    wide = [rng.standard_normal((b, h, l, 2 * d)).astype(dtype) for _ in range(3)]
    yield "step2_last", *(x[..., ::2] for x in wide)
    # Every other row and head.
    tall = [rng.standard_normal((b, 2 * h, 2 * l, d)).astype(dtype) for _ in range(3)]
    yield "step2_rows", *(x[:, ::2, ::2] for x in tall)
    yield (
        "fortran",
        *(np.asfortranarray(rng.standard_normal((b, h, l, d)).astype(dtype)) for _ in range(3)),
    )
    rev = [rng.standard_normal((b, h, l, d)).astype(dtype) for _ in range(3)]
    yield "reversed", *(x[::-1, :, ::-1] for x in rev)
    # A packed (B, L, 3, H, D) qkv buffer, split without copies.
    qkv = rng.standard_normal((b, l, 3, h, d)).astype(dtype)
    yield "packed_qkv", *(qkv[:, :, n].swapaxes(1, 2) for n in range(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "layout", ["swapaxes", "step2_last", "step2_rows", "fortran", "reversed", "packed_qkv"]
)
def test_strided_layouts(attention, rng, dtype, layout):
    _name, q, k, v = next(x for x in _layouts(rng, dtype) if x[0] == layout)
    out = attention(q, k, v, causal=True)
    assert_matches(out, dense_attention(q, k, v, causal=True)[0], dtype)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_huge_logits_do_not_overflow(attention, rng, dtype):
    q, k, v = random_qkv(rng, (1,), 2, 2, 20, 90, 8, dtype=dtype)
    q = q * 1e4 / np.abs(q).max()  # scores reach ~1e4 * sqrt(D) / sqrt(D)
    k = k / np.abs(k).max(axis=-1, keepdims=True)
    out, lse = attention(q, k, v, scale=1.0, return_lse=True)
    ref_out, ref_lse = dense_attention(q, k, v, scale=1.0)
    assert np.isfinite(out).all()
    assert np.isfinite(lse).all()
    assert_matches(out, ref_out, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_native_matches_numpy_backend(native, rng, dtype):
    import cpuattn

    q, k, v = random_qkv(rng, (3,), 8, 2, 150, 300, 40, dtype=dtype)
    mask = rng.random((8, 1, 300)) > 0.2
    kw = {
        "mask": mask,
        "causal": True,
        "window": (100, 5),
        "kv_lengths": [300, 123, 0],
        "return_lse": True,
    }
    out, lse = native(q, k, v, **kw)
    np_out, np_lse = cpuattn.attention(q, k, v, backend="numpy", **kw)
    assert_matches(out, np_out, dtype)
    assert_matches(lse, np_lse, dtype, "lse")
