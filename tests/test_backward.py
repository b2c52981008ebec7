"""``attention_backward`` against float64 finite differences of ``attention`` for every option,
plus its contract: empty rows and unreached keys give 0, half dtypes, strides, 2-D inputs,
varlen, determinism and errors that name the argument. torch: tests/test_backward_torch.py."""

import functools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import random_qkv

import cpuattn
from cpuattn import _native, _numpy_backward
from cpuattn._request import BF16

F64 = np.float64
BACKENDS = ["numpy", "native"] if _native.available() else ["numpy"]


def loss_and_upstream(q, k, v, rng, **options):
    """The loss ``sum(attention(q, k, v) * dout)`` for a fixed random ``dout``. The forward
    runs on the native backend when built (float64: the same values, 5x faster on these tiny
    shapes; one thread, since threads only cost here)."""
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape)

    def loss(q, k, v):
        return float(np.sum(cpuattn.attention(q, k, v, num_threads=1, **options) * dout))

    return loss, dout, out, lse


def finite_differences(loss, arrays, h=1e-6):
    """Central differences of ``loss`` in every element of each array (float64)."""
    grads = []
    for which, x in enumerate(arrays):
        grad = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            shifted = [a.copy() for a in arrays]
            shifted[which][idx] = x[idx] + h
            up = loss(*shifted)
            shifted[which][idx] = x[idx] - h
            grad[idx] = (up - loss(*shifted)) / (2 * h)
        grads.append(grad)
    return grads


def check_gradients(backward, q, k, v, rng, **options):
    """``backward`` (conftest's fixture: each backend and ISA) against finite differences."""
    loss, dout, out, lse = loss_and_upstream(q, k, v, rng, **options)
    got = backward(dout, q, k, v, out, lse, **options)
    expected = finite_differences(loss, [q, k, v])
    for name, g, e, x in zip("qkv", got, expected, (q, k, v), strict=True):
        assert g.shape == x.shape, name
        assert g.dtype == x.dtype, name
        assert np.isfinite(g).all(), f"d{name}: not finite"
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-7 * max(1.0, np.abs(e).max(initial=0)))
    return got


ALIBI = np.array([0.5, 0.3, 0.2, 0.1])
OPTIONS = {
    "plain": {},
    "scale": {"scale": 0.7},
    "causal": {"causal": True},
    "causal_top_left": {"causal": "top_left"},
    "diagonal_before": {"causal": True, "diagonal": -2},
    "diagonal_past": {"causal": True, "diagonal": 4},
    "window": {"window": (2, 1)},
    "causal_window": {"causal": True, "window": (3, 0)},
    "window_right_only": {"window": (-1, 2)},
    "kv_lengths": {"kv_lengths": np.array([4, 0, 3])},
    "kv_lengths_causal": {"kv_lengths": np.array([2, 0, 4]), "causal": True},
    "softcap": {"softcap": 1.5},
    "alibi": {"alibi_slopes": ALIBI},
    "alibi_top_left": {"alibi_slopes": ALIBI, "causal": "top_left"},
    "alibi_diagonal": {"alibi_slopes": ALIBI, "diagonal": 3},
    "everything": {
        "causal": True,
        "window": (4, 0),
        "softcap": 2.0,
        "alibi_slopes": ALIBI,
        "kv_lengths": np.array([4, 1, 3]),
    },
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize(
    "shape",
    [(4, 2, 5, 7, 3, 2), (4, 1, 6, 4, 2, 3)],
    ids=["gqa_lq<lk", "mqa_lq>lk"],  # (Hq, Hkv, Lq, Lk, D, Dv): Dv != D in both
)
def test_matches_finite_differences(backward, rng, options, shape):
    hq, hkv, lq, lk, d, dv = shape
    q, k, v = random_qkv(rng, (3,), hq, hkv, lq, lk, d, dv, dtype=F64)
    if "softcap" in options:
        q = q * 3  # scores of a few units: tanh bends
    check_gradients(backward, q, k, v, rng, **options)


@pytest.mark.parametrize("kind", ["bool", "float", "float_with_-inf", "bool_broadcast"])
def test_masks_match_finite_differences(backward, rng, kind):
    q, k, v = random_qkv(rng, (2,), 2, 1, 5, 6, 3, 4, dtype=F64)
    if kind == "bool":
        mask = rng.random((2, 2, 5, 6)) < 0.6
        mask[0, 1, 2] = False  # a row that keeps nothing
        mask[1, :, :, 4] = False  # a key that no query keeps
    elif kind == "float":
        mask = rng.standard_normal((2, 2, 5, 6))
    elif kind == "float_with_-inf":
        mask = np.where(rng.random((5, 6)) < 0.3, -np.inf, rng.standard_normal((5, 6)))
    else:
        mask = rng.random((1, 1, 6)) < 0.5
    dq, dk, dv = check_gradients(backward, q, k, v, rng, mask=mask, causal=True)
    if kind == "bool":
        assert np.all(dq[0, 1, 2] == 0)
        assert np.all(dk[1, :, 4] == 0)
        assert np.all(dv[1, :, 4] == 0)


def test_two_d_inputs(backward, rng):
    q, k, v = random_qkv(rng, (), 1, 1, 4, 6, 3, 2, dtype=F64)
    q, k, v = q[0], k[0], v[0]
    mask = rng.random((4, 6)) < 0.7
    grads = check_gradients(
        backward, q, k, v, rng, causal=True, mask=mask, alibi_slopes=np.array([0.4])
    )
    assert [g.shape for g in grads] == [(4, 3), (6, 3), (6, 2)]


def test_strided_views(backward, rng):
    """(B, L, H, D) buffers viewed as (B, H, L, D), and a reversed dout, read in place: the
    same gradients as contiguous copies, up to BLAS's layout-dependent summation order."""
    q_blhd = rng.standard_normal((2, 40, 4, 8))
    k_blhd = rng.standard_normal((2, 50, 2, 8))
    v_blhd = rng.standard_normal((2, 50, 2, 6))
    q, k, v = (x.swapaxes(1, 2) for x in (q_blhd, k_blhd, v_blhd))
    options = {"causal": True, "window": (20, 0)}
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape[::-1]).T  # every axis strided
    strided = backward(dout, q, k, v, out, lse, **options)
    dense = [np.ascontiguousarray(x) for x in (dout, q, k, v, out, lse)]
    for a, b in zip(strided, backward(*dense, **options), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * np.abs(b).max())


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_half_inputs_accumulate_in_float32(backward, rng, dtype):
    """Half gradients: float64's on the same rounded inputs, rounded once (plus the forward's
    rounded out in delta)."""
    q, k, v = random_qkv(rng, (2,), 4, 2, 150, 300, 16, dtype=dtype)
    options = {"causal": True, "softcap": 3.0}
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = backward(dout, q, k, v, out, lse, **options)
    wide = [x.astype(F64) for x in (q, k, v)]
    out64, lse64 = cpuattn.attention(*wide, return_lse=True, **options)
    expected = cpuattn.attention_backward(dout.astype(F64), *wide, out64, lse64, **options)
    tolerance = 2e-2 if dtype == BF16 else 3e-3
    for g, e, x in zip(got, expected, (q, k, v), strict=True):
        assert g.dtype == x.dtype
        err = np.abs(g.astype(F64) - e).max()
        assert err <= tolerance * np.abs(e).max(), err


def test_float32_out_and_half_kv_cache(backward, rng):
    """out_dtype=float32 outputs and a float32 q over a float16 K/V cache are accepted."""
    q, k, v = random_qkv(rng, (1,), 2, 1, 20, 30, 8, dtype=np.float16)
    out, lse = cpuattn.attention(q, k, v, out_dtype=np.float32, return_lse=True)
    dq, dk, dv = backward(out, q, k, v, out, lse)
    assert (dq.dtype, dk.dtype, dv.dtype) == (np.float16,) * 3
    q32 = q.astype(np.float32)
    out, lse = cpuattn.attention(q32, k, v, return_lse=True)
    dq32, dk, dv = backward(out, q32, k, v, out, lse)
    assert (dq32.dtype, dk.dtype, dv.dtype) == (np.float32, np.float16, np.float16)
    np.testing.assert_allclose(dq32, dq, atol=3e-3 * np.abs(dq32).max())


def test_empty_rows_and_unreached_keys_are_zero(backward, rng):
    q, k, v = random_qkv(rng, (3,), 2, 2, 30, 20, 8, dtype=np.float32)
    options = {"causal": True, "kv_lengths": np.array([20, 0, 12])}  # Lq > Lk: early rows empty
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = backward(dout, q, k, v, out, lse, **options)
    assert np.isfinite(dq).all()
    assert np.isfinite(dk).all()
    assert np.isfinite(dv).all()
    assert np.all(dq[0, :, :10] == 0)
    assert np.all(dq[2, :, :18] == 0)
    assert np.all(dq[1] == 0)
    assert np.all(dk[1] == 0)
    assert np.all(dv[1] == 0)
    assert np.all(dk[2, :, 12:] == 0)
    assert np.all(dv[2, :, 12:] == 0)
    # Row 10 keeps key 0 alone: its weight is 1 whatever q is, so its dq is 0 (up to rounding).
    assert np.abs(dq[0, :, 11:]).min(axis=-1).all()


def test_huge_logits_stay_finite_and_accurate(backward, rng):
    """Scores in the thousands: the weights are near one-hot; float32 follows float64."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 64, 80, 16, dtype=F64)
    q = q * 300
    grads = {}
    for dtype in (np.float32, F64):
        args = [x.astype(dtype) for x in (q, k, v)]
        out, lse = cpuattn.attention(*args, return_lse=True, causal=True)
        dout = np.ones(out.shape, dtype)
        grads[dtype] = backward(dout, *args, out, lse, causal=True)
        assert all(np.isfinite(g).all() for g in grads[dtype])
    for g32, g64 in zip(grads[np.float32], grads[F64], strict=True):
        np.testing.assert_allclose(g32, g64, atol=2e-3 * max(1.0, np.abs(g64).max()))


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "lq", "lk"),
    [((2,), 4, 1, 200, 300), ((), 1, 1, 700, 900), ((), 2, 2, 40, 3000), ((), 16, 1, 300, 200)],
    # one_long_head, keys_in_chunks: dQ summed over key chunks (native); wide_group: dK and dV
    # summed over blocks of query rows
    ids=["gqa", "one_long_head", "keys_in_chunks", "wide_group"],
)
def test_deterministic_for_any_thread_count(backward, rng, batch, hq, hkv, lq, lk):
    q, k, v = random_qkv(rng, batch, hq, hkv, lq, lk, 16)
    out, lse = cpuattn.attention(q, k, v, return_lse=True, causal=True)
    runs = [backward(out, q, k, v, out, lse, causal=True, num_threads=n) for n in (1, 2, 3, 3)]
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_is_each_sequence_on_its_own(rng, backend):
    lengths_q, lengths_k = [5, 0, 40, 3], [9, 4, 60, 0]
    cu_q, cu_k = np.cumsum([0, *lengths_q]), np.cumsum([0, *lengths_k])
    q = rng.standard_normal((cu_q[-1], 4, 8))
    k = rng.standard_normal((cu_k[-1], 2, 8))
    v = rng.standard_normal((cu_k[-1], 2, 5))
    slopes = rng.random((4, 4))
    options = {"causal": True, "window": (10, 0), "softcap": 4.0}
    out, lse = cpuattn.attention_varlen(
        q, k, v, cu_q, cu_k, return_lse=True, alibi_slopes=slopes, **options
    )
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = cpuattn.attention_varlen_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, alibi_slopes=slopes, backend=backend, **options
    )
    for b in range(4):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        parts = [x.swapaxes(0, 1) for x in (dout[rq], q[rq], k[rk], v[rk], out[rq])]
        expected = cpuattn.attention_backward(
            *parts[:4], parts[4], lse[:, rq], alibi_slopes=slopes[b], backend=backend, **options
        )
        for got, e in zip((dq[rq], dk[rk], dv[rk]), expected, strict=True):
            np.testing.assert_array_equal(got, e.swapaxes(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(0, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 2),
    lq=st.integers(0, 5),
    lk=st.integers(0, 5),
    d=st.integers(1, 3),
    dv=st.integers(1, 3),
    causal=st.sampled_from([False, True, "top_left"]),
    window=st.sampled_from([None, (1, 0), (0, 2), (-1, 1)]),
    with_lengths=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_finite_differences(
    backend, batch, hkv, group, lq, lk, d, dv, causal, window, with_lengths, seed
):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, (batch,), hkv * group, hkv, lq, lk, d, dv, dtype=F64)
    lengths = rng.integers(0, lk + 1, batch) if with_lengths else None
    backward = functools.partial(cpuattn.attention_backward, backend=backend)
    check_gradients(backward, q, k, v, rng, causal=causal, window=window, kv_lengths=lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(rng, backend):
    q, k, v = random_qkv(rng, (2,), 4, 2, 5, 7, 8)
    out, lse = cpuattn.attention(q, k, v, return_lse=True)

    def raises(exc, match, *args, **options):
        with pytest.raises(exc, match=match):
            cpuattn.attention_backward(*args, **{"backend": backend, **options})

    raises(ValueError, r"^dout: expected shape \(\*batch, Hq, Lq, Dv\)", out[0], q, k, v, out, lse)
    raises(TypeError, r"^dout: expected dtype float32", out.astype(F64), q, k, v, out, lse)
    raises(TypeError, r"^out: expected dtype", out, q, k, v, out.astype(np.int32), lse)
    raises(ValueError, r"^out: expected shape", out, q, k, v, out[..., :4], lse)
    raises(TypeError, r"^lse: expected dtype float32", out, q, k, v, out, lse.astype(F64))
    raises(ValueError, r"^lse: expected shape \(\*batch, Hq, Lq\)", out, q, k, v, out, lse[0])
    raises(ValueError, r"^lse: expected shape \(Lq,\)", out[0, 0], q[0, 0], k[0, 0], v[0, 0],
           out[0, 0], lse)  # fmt: skip
    raises(ValueError, r"^k: expected", out, q, k[..., :4], v, out, lse)
    raises(ValueError, r"^mask: shape", out, q, k, v, out, lse, mask=np.ones((3, 3), bool))
    raises(ValueError, r"^window\[0\]", out, q, k, v, out, lse, window=(-2, 0))
    raises(TypeError, r"^softcap", out, q, k, v, out, lse, softcap="big")
    raises(ValueError, r"^backend", out, q, k, v, out, lse, backend="gpu")


def test_bad_varlen_inputs_name_the_argument(rng):
    q, k, v = rng.standard_normal((10, 2, 4)), rng.standard_normal((12, 1, 4)), None
    v = rng.standard_normal((12, 1, 3))
    cu_q, cu_k = np.array([0, 4, 10]), np.array([0, 5, 12])
    out, lse = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)

    def raises(exc, match, *args, **options):
        with pytest.raises(exc, match=match):
            cpuattn.attention_varlen_backward(*args, **options)

    raises(ValueError, r"^lse: expected shape \(Hq, total_q\)", out, q, k, v, out, lse.T,
           cu_q, cu_k)  # fmt: skip
    raises(ValueError, r"^dout: expected shape \(total_q, Hq, Dv\)", out[1:], q, k, v, out, lse,
           cu_q, cu_k)  # fmt: skip
    raises(ValueError, r"^cu_seqlens_q", out, q, k, v, out, lse, np.array([0, 4, 9]), cu_k)


def test_tiles_outside_the_band_are_skipped(rng, monkeypatch):
    """A causal sliding window of 64 keys over 1024 positions visits only the band's tiles."""
    visited = []
    weights = _numpy_backward._recompute_weights

    def counting(req, b, heads, rows, cols, *args):
        visited.append((rows.start, cols.start))
        return weights(req, b, heads, rows, cols, *args)

    monkeypatch.setattr(_numpy_backward, "_recompute_weights", counting)
    q, k, v = random_qkv(rng, (), 1, 1, 1024, 1024, 8)
    options = {"causal": True, "window": (63, 0)}
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    cpuattn.attention_backward(out, q, k, v, out, lse, backend="numpy", **options)
    bq, bk = _numpy_backward.BLOCK_Q, _numpy_backward.BLOCK_K
    for i0, j0 in visited:  # every visited tile meets the band j in [i - 63, i]
        assert j0 <= i0 + bq - 1
        assert i0 - 63 <= j0 + bk - 1
    assert len(visited) < (1024 // bq) * (1024 // bk) / 2


def test_training_example_loss_goes_down(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "examples"))
    from train_numpy import train

    losses = train(steps=100)
    assert losses[-1] < 0.5 * losses[0]


def test_docstring_examples():
    import doctest

    from cpuattn import _backward

    failures, tried = doctest.testmod(_backward, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 2
    assert failures == 0


@pytest.mark.parametrize("how", ["bool_mask", "float_mask", "causal", "kv_lengths"])
def test_nan_in_keys_not_kept_never_reaches_a_gradient(backward, rng, how):
    """As in the forward: a query and a key that are not kept exchange nothing, even NaN/inf.
    The gradients equal those with the dropped keys' K/V (and an empty row's q) zeroed."""
    q, k, v = random_qkv(rng, (2,), 4, 2, 20, 30, 8)
    dropped = np.zeros(30, bool)
    dropped[[0, 7, 8, 29]] = True
    options = {
        "bool_mask": {"mask": ~dropped},
        "float_mask": {"mask": np.where(dropped, -np.inf, 0.25).astype(np.float32)},
        "causal": {"causal": "top_left"},  # rows see keys j <= i < 20: keys 20.. dropped
        "kv_lengths": {"kv_lengths": np.array([20, 20])},
    }[how]
    if how in ("causal", "kv_lengths"):
        dropped = np.arange(30) >= 20
    clean = [x.copy() for x in (q, k, v)]
    clean[1][..., dropped, :] = 0
    clean[2][..., dropped, :] = 0
    dirty = [x.copy() for x in clean]
    dirty[1][..., dropped, :] = np.nan
    dirty[2][..., dropped, :] = np.inf
    if how == "bool_mask":  # and a query row that keeps nothing holds NaN
        options["mask"] = np.broadcast_to(options["mask"], (20, 30)).copy()
        options["mask"][5] = False
        clean[0][..., 5, :] = 0
        dirty[0][..., 5, :] = np.nan
    out, lse = cpuattn.attention(*clean, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    expected = backward(dout, *clean, out, lse, **options)
    got = backward(dout, *dirty, out, lse, **options)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
    "shape",
    [(3, 5, 7, 0, 4), (3, 0, 7, 4, 4), (3, 5, 0, 4, 4), (0, 5, 7, 4, 4), (3, 5, 7, 4, 0)],
    ids=["d=0", "lq=0", "lk=0", "no_heads", "dv=0"],  # (H, Lq, Lk, D, Dv)
)
def test_empty_dimensions(backward, rng, shape):
    """Zero-sized axes: gradients of the right shapes. D = 0 makes every score 0: uniform
    weights over the kept keys, so dv = P^T dout."""
    h, lq, lk, d, dv = shape
    q, k, v = random_qkv(rng, (2,), h, h, lq, lk, d, dv)
    out, lse = cpuattn.attention(q, k, v, return_lse=True, causal=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = backward(dout, q, k, v, out, lse, causal=True)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.shape == x.shape
    if dv == 0 or lq == 0:
        assert not any(np.any(g) for g in grads)
    if d == 0:  # bottom-right causal, Lk - Lq = 2: query i keeps keys 0 .. i + 2
        keep = np.arange(lk) <= np.arange(lq)[:, None] + 2
        p = keep / keep.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(grads[2], p.T @ dout, rtol=1e-6)
