"""Large heads (D + Dv >= 1024): the float step takes the tile phase by phase (scores with D
in slices, then the epilogue, then P.V with Dv in slices; csrc/kernels/tile_step.inl).

Every feature the epilogue applies, odd sizes at the slice edges (D = 1030: 8 slices of 128
and one of 6; Dv = 77: one partial slice), row counts that are not whole register blocks,
and the P.V path that skips zero weights when V holds inf, against the float64 reference.
"""

import numpy as np
import pytest
from reference import check, random_qkv

F32 = np.float32


@pytest.mark.parametrize(
    ("lq", "lk", "d", "dv"),
    [(70, 130, 512, 512), (13, 67, 1030, 77), (7, 129, 600, 424), (1, 65, 256, 1100)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
def test_matches_reference(attention, rng, lq, lk, d, dv, dtype):
    q, k, v = random_qkv(rng, (2,), 4, 2, lq, lk, d, dv, dtype)
    check(attention, q, k, v, dtype)


@pytest.mark.parametrize(
    "kw",
    [
        {"causal": True},
        {"causal": "top_left", "window": (20, 5)},
        {"softcap": 2.0, "scale": 0.2},
        {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
        {"kv_lengths": np.array([0, 100])},
        {"mask": "bool"},
        {"mask": "float"},
    ],
    ids=lambda kw: "-".join(kw),
)
def test_epilogue_features(attention, rng, kw):
    q, k, v = random_qkv(rng, (2,), 4, 2, 70, 130, 520, 600)
    if kw.get("mask") == "bool":
        kw = {"mask": rng.random((70, 130)) > 0.3}
    elif kw.get("mask") == "float":
        kw = {"mask": (rng.standard_normal((2, 1, 70, 130)) * 3).astype(F32)}
    check(attention, q, k, v, F32, **kw)


def test_inf_value_in_a_dropped_key_stays_out(attention, rng):
    """Rows whose causal band drops key 100 never see its inf; rows that keep it get inf
    exactly in its column (the zero-weight-skipping P.V of the phased step)."""
    q, k, v = random_qkv(rng, (), 2, 1, 130, 130, 512, 600)
    vd = v.copy()
    vd[0, 100, 3] = np.inf
    out = attention(q, k, vd, causal=True)
    assert np.array_equal(out[:, :100], attention(q, k, v, causal=True)[:, :100])
    assert np.all(out[:, 100:, 3] == np.inf)
    assert np.isfinite(np.delete(out[:, 100:], 3, axis=-1)).all()


def test_empty_head_dim_with_wide_values(attention, rng):
    """D = 0: every score is 0, so out is the mean of the kept values."""
    q, k, v = random_qkv(rng, (), 2, 2, 9, 70, 0, 1100)
    out = attention(q, k, v)
    np.testing.assert_allclose(
        out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), rtol=1e-5, atol=1e-6
    )
