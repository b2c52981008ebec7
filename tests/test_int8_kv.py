"""int8 k and v with float32 scales (``attention(k_scale=, v_scale=)``): row j stands for
``k[..., j, :] * k_scale[..., j]``. Both backends (native on each ISA) against float64 attention
on the dequantized rows, out and lse: split-KV decode, prefill over head dims, every masking
option, strided views, half q, zero and huge scales, thread-count determinism, bad input."""

import ml_dtypes
import numpy as np
import pytest
from reference import assert_close, dense_attention, per_head_options

import cpuattn

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = 3e-5  # float32 accuracy: x max|v dequantized| for out, x max(|lse|, 1) for lse
OUT_TOL = {F32: TOL, F16: 2e-3, BF16: 1e-2}  # by output dtype: half outputs are rounded once


def int8_kv(rng, shape, magnitude=1.0):
    """(int8, float32 scales) from quantize_int8 of normal rows whose sizes vary row to row."""
    x = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, (*shape[:-1], 1)) * magnitude
    return cpuattn.quantize_int8(x)


def dequantized(x, scale):
    """Row j is x[..., j, :] * scale[..., j]: exact in float64 (8 x 24 significant bits)."""
    return np.asarray(x).astype(F64) * np.asarray(scale).astype(F64)[..., None]


def reference(q, k, k_scale, v, v_scale, sinks=None, **kw):
    """float64 (out, lse) on the dequantized rows: tests/reference.py, or with sinks (which it
    lacks) the NumPy backend in float64."""
    q64, k64, v64 = q.astype(F64), dequantized(k, k_scale), dequantized(v, v_scale)
    if sinks is None:
        return dense_attention(q64, k64, v64, **kw)
    return cpuattn.attention(q64, k64, v64, sinks=sinks, return_lse=True, backend="numpy", **kw)


def check(attention, q, k, k_scale, v, v_scale, **kw):
    """attention(...) with lse against the float64 reference; returns (out, lse)."""
    out_dtype = np.dtype(kw.get("out_dtype") or q.dtype)
    out, lse = attention(q, k, v, k_scale=k_scale, v_scale=v_scale, return_lse=True, **kw)
    ref_kw = {n: x for n, x in kw.items() if n not in ("out_dtype", "num_threads")}
    ref_out, ref_lse = reference(q, k, k_scale, v, v_scale, **ref_kw)
    assert out.dtype == out_dtype
    assert lse.dtype == F32
    vmax = float(np.abs(dequantized(v, v_scale)).max(initial=0))
    assert_close(out, ref_out, OUT_TOL[out_dtype] * vmax, "out")
    finite = np.isfinite(ref_lse)
    lse_scale = max(float(np.abs(ref_lse[finite]).max(initial=0)), 1.0)
    assert_close(lse, ref_lse, TOL * lse_scale, "lse")
    return out, lse


def problem(rng, batch, hq, hkv, lq, lk, d, dv=None, q_dtype=F32):
    q = rng.standard_normal((batch, hq, lq, d)).astype(q_dtype)
    k, k_scale = int8_kv(rng, (batch, hkv, lk, d))
    v, v_scale = int8_kv(rng, (batch, hkv, lk, d if dv is None else dv))
    return q, k, k_scale, v, v_scale


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "lq", "lk", "lengths"),
    [
        (2, 32, 8, 1, 1000, None),
        (1, 32, 8, 4, 3000, None),
        (1, 4, 1, 1, 2500, None),  # MQA, one sequence: split-KV does the work
        (3, 8, 2, 1, 1537, [1537, 0, 901]),
    ],
    ids=["gqa-1000", "gqa-lq4-3000", "mqa-2500", "lengths"],
)
def test_decode(attention, rng, batch, hq, hkv, lq, lk, lengths):
    q, k, ks, v, vs = problem(rng, batch, hq, hkv, lq, lk, 128)
    kw = {} if lengths is None else {"kv_lengths": np.array(lengths)}
    check(attention, q, k, ks, v, vs, causal=True, **kw)


@pytest.mark.parametrize("d", [13, 40, 80, 128, 256])
def test_prefill_head_dims(attention, rng, d):
    q, k, ks, v, vs = problem(rng, 2, 4, 2, 129, 129, d)
    check(attention, q, k, ks, v, vs, causal=True)


CASES = {  # name: (Lq, Lk, Dv, options; "alibi"/"sinks" values drawn in the test)
    "dv-differs": (129, 129, 24, {}),
    "lq<lk-bottom-right": (50, 129, 40, {"causal": True}),
    "lq<lk-top-left": (50, 129, 40, {"causal": "top_left"}),
    "lq>lk-bottom-right": (129, 50, 40, {"causal": True}),  # first 79 rows keep no key
    "lq>lk-top-left": (129, 50, 40, {"causal": "top_left"}),
    "window": (129, 129, 40, {"window": (16, 3)}),
    "causal-window": (129, 129, 40, {"causal": True, "window": (31, 0)}),
    "kv-lengths": (129, 129, 40, {"causal": True, "kv_lengths": np.array([0, 129, 77])}),
    "softcap": (129, 129, 40, {"causal": True, "softcap": 2.5, "scale": 1.0}),
    "alibi": (129, 129, 40, {"causal": True, "alibi_slopes": "heads"}),
    "alibi-per-batch": (60, 129, 40, {"alibi_slopes": "batch"}),
    "sinks": (129, 129, 40, {"causal": True, "sinks": "heads"}),
    "sinks-no-key": (129, 129, 40, {"kv_lengths": np.array([0, 129, 5]), "sinks": "batch"}),
    "diagonal": (70, 129, 40, {"causal": True, "diagonal": -10}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_options(attention, rng, case):
    lq, lk, dv, kw = CASES[case]
    q, k, ks, v, vs = problem(rng, 3, 4, 2, lq, lk, 40, dv)
    kw = per_head_options(rng, kw, batch=3, hq=4)
    out, lse = check(attention, q, k, ks, v, vs, **kw)
    if case == "lq>lk-bottom-right":
        assert np.all(out[:, :, :79] == 0)
        assert np.all(lse[:, :, :79] == -np.inf)
    if case == "sinks-no-key":  # no key: out 0, lse = the sink
        assert np.all(out[0] == 0)
        expected = np.repeat(kw["sinks"][0, :, None], lq, axis=1)
        np.testing.assert_allclose(lse[0], expected, rtol=1e-6)


def test_strided_and_transposed_views(attention, rng):
    """k and its scales from a (B, L, H, D) buffer swapped to (B, H, L, D); v and its scales
    every other row of a bigger array; a k with a non-unit last stride; negative strides."""
    b, h, lk, d = 2, 2, 97, 48
    q = rng.standard_normal((b, 2 * h, 33, d)).astype(F32)
    k_buf, ks_buf = int8_kv(rng, (b, lk, h, d))
    v_buf, vs_buf = int8_kv(rng, (b, h, 2 * lk, d))
    k, ks = k_buf.swapaxes(1, 2), ks_buf.swapaxes(1, 2)
    v, vs = v_buf[:, :, ::2], vs_buf[:, :, ::2]
    assert not k.flags.c_contiguous
    assert not ks.flags.c_contiguous
    assert not vs.flags.c_contiguous
    check(attention, q, k, ks, v, vs, causal=True)
    wide = np.zeros((b, h, lk, 2 * d), np.int8)
    wide[..., ::2] = k
    check(attention, q, wide[..., ::2], ks, v, vs, causal=True)  # last stride 2: copied once
    check(attention, q, k[:, ::-1], ks[:, ::-1], v[:, :, ::-1], vs[:, :, ::-1], causal=True)


def test_two_dimensional_call(attention, rng):
    """(Lq, D) q with (Lk, D) int8 k and v take (Lk,) scales."""
    q = rng.standard_normal((20, 16)).astype(F32)
    k, ks = int8_kv(rng, (45, 16))
    v, vs = int8_kv(rng, (45, 8))
    out = attention(q, k, v, k_scale=ks, v_scale=vs, causal=True)
    ref, _ = dense_attention(q, dequantized(k, ks), dequantized(v, vs), causal=True)
    assert_close(out, ref, TOL * np.abs(dequantized(v, vs)).max(), "out")


@pytest.mark.parametrize("q_dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("out_dtype", [None, F32], ids=["out-q-dtype", "out-float32"])
@pytest.mark.parametrize(("lq", "lk"), [(70, 130), (1, 2000)], ids=["prefill", "decode"])
def test_half_q(attention, rng, q_dtype, out_dtype, lq, lk):
    """Half q computes in float32: float32 accuracy with out_dtype=float32 (on the rounded q),
    the half output's rounding otherwise."""
    q, k, ks, v, vs = problem(rng, 2, 4, 2, lq, lk, 64, q_dtype=q_dtype)
    check(attention, q, k, ks, v, vs, causal=True, out_dtype=out_dtype)


def test_zero_rows(attention, rng):
    """Rows of zeros quantize to scale 0 and q 0; a batch entry of only such rows has every
    score 0, so it attends uniformly to zeros: out 0, lse log(Lk)."""
    b, h, lk, d = 2, 2, 150, 32
    x_k = rng.standard_normal((b, h, lk, d))
    x_v = rng.standard_normal((b, h, lk, d))
    x_k[0, :, ::3] = 0
    x_v[0, :, 1::4] = 0
    x_k[1] = x_v[1] = 0
    (k, ks), (v, vs) = cpuattn.quantize_int8(x_k), cpuattn.quantize_int8(x_v)
    assert np.all(ks[1] == 0)
    assert np.all(ks[0, :, ::3] == 0)
    q = rng.standard_normal((b, 2 * h, 40, d)).astype(F32)
    out, lse = check(attention, q, k, ks, v, vs)
    assert np.all(out[1] == 0)
    np.testing.assert_allclose(lse[1], np.log(lk), rtol=1e-6)
    # Garbage int8 values under a zero scale are zero rows all the same.
    k[1] = rng.integers(-127, 128, k[1].shape, dtype=np.int8)
    out2, lse2 = check(attention, q, k, ks, v, vs)
    assert np.all(out2[1] == 0)
    np.testing.assert_allclose(lse2[1], np.log(lk), rtol=1e-6)


@pytest.mark.parametrize(("lq", "lk"), [(129, 129), (1, 2500)], ids=["prefill", "decode"])
def test_huge_scales(attention, rng, lq, lk):
    """k scales near 1e30 make logits near 1e32 (finite in float32): the softmax is one-hot on
    the largest score, never NaN or inf; v scales near 1e30 keep out finite and accurate."""
    q, k, _, v, _ = problem(rng, 1, 4, 2, lq, lk, 64)
    ks = rng.uniform(0.5e30, 2e30, k.shape[:-1]).astype(F32)
    vs = rng.uniform(0.5e30, 2e30, v.shape[:-1]).astype(F32)
    out, lse = check(attention, q, k, ks, v, vs, causal=True)
    assert np.isfinite(out).all()
    assert np.isfinite(lse).all()
    assert np.abs(lse).max() > 1e30


def test_scales_of_either_sign(attention, rng):
    """Only finiteness is asked of a scale: a negative one negates the row."""
    q, k, ks, v, vs = problem(rng, 2, 4, 2, 33, 77, 24)
    ks = ks * rng.choice([-1, 1], ks.shape).astype(F32)
    vs = vs * rng.choice([-1, 1], vs.shape).astype(F32)
    check(attention, q, k, ks, v, vs, causal=True)


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "lq", "lk"),
    [(1, 8, 2, 1, 3000), (2, 4, 2, 129, 129), (3, 8, 1, 5, 700)],
    ids=["decode-split", "prefill", "chunk"],
)
def test_bitwise_equal_for_any_thread_count(native, rng, batch, hq, hkv, lq, lk):
    q, k, ks, v, vs = problem(rng, batch, hq, hkv, lq, lk, 64)
    runs = [
        native(q, k, v, k_scale=ks, v_scale=vs, causal=True, return_lse=True, num_threads=n)
        for n in (1, 2, 3)
    ]
    for out, lse in runs[1:]:
        np.testing.assert_array_equal(out, runs[0][0])
        np.testing.assert_array_equal(lse, runs[0][1])
    check(native, q, k, ks, v, vs, causal=True, num_threads=3)


def _bad(rng):
    q, k, ks, v, vs = problem(rng, 2, 4, 2, 5, 9, 8)
    kv = {"k": k, "v": v, "k_scale": ks, "v_scale": vs}
    return q, kv


ERRORS = {  # name: (change to the arguments, exception, message)
    "int8-k-without-scales": ({"k_scale": None}, TypeError, r"^k: an int8 k needs k_scale"),
    "int8-v-without-scales": ({"v_scale": None}, TypeError, r"^v: an int8 v needs v_scale"),
    "scales-with-float-k": (
        {"k": "float", "v": "float"},
        TypeError,
        r"^k_scale: given for a float32 k",
    ),
    "int8-k-float-v": ({"v": "float", "v_scale": None}, TypeError, r"^v: dtype float32 differs"),
    "int8-k-float-v-with-scale": ({"v": "float"}, TypeError, r"^v_scale: given for a float32 v"),
    "wrong-scale-shape": ({"k_scale": "transposed"}, ValueError, r"^k_scale: expected shape"),
    "scale-missing-an-axis": ({"v_scale": "row"}, ValueError, r"^v_scale: expected shape"),
    "integer-scales": ({"k_scale": "int"}, TypeError, r"^k_scale: expected float32 scales"),
    "float64-q": ({"q": F64}, TypeError, r"^q: int8 k and v compute in float32.*float64"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_names_the_argument(attention, rng, case):
    q, kv = _bad(rng)
    change, exc, match = ERRORS[case]
    for name, value in change.items():
        if name == "q":
            q = q.astype(value)
        elif value is None:
            kv[name] = None
        elif value == "float":
            kv[name] = kv[name].astype(F32)
        elif value == "transposed":
            kv[name] = kv[name].swapaxes(-1, -2)
        elif value == "row":
            kv[name] = kv[name][..., 0]
        elif value == "int":
            kv[name] = np.ones(kv[name].shape, np.int32)
        else:
            kv[name] = kv[name].copy()
            kv[name][1, 0, 3] = value
    with pytest.raises(exc, match=match):
        attention(q, **kv)


@pytest.mark.parametrize("which", ["k_scale", "v_scale"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_scale_reaches_only_the_rows_that_keep_its_key(attention, rng, which, bad):
    """A scale is part of its key's row: NaN or inf there acts as NaN or inf in that K or V
    row, reaching the rows that keep the key (bottom-right causal: the later queries) and
    nothing else, and nothing at all past kv_lengths (a cache's unused tail may hold
    anything)."""
    b, hq, hkv, lq, lk, d = 2, 4, 2, 6, 70, 16
    q = rng.standard_normal((b, hq, lq, d)).astype(F32)
    (k, ks), (v, vs) = (cpuattn.quantize_int8(rng.standard_normal((b, hkv, lk, d))) for _ in "kv")
    lengths = np.array([lk, 60])
    bad_keys = {0: 66, 1: 57}  # entry 1 also has every key past its 60 set bad
    scales = {"k_scale": ks, "v_scale": vs}
    clean = {name: x.copy() for name, x in scales.items()}
    for entry, key in bad_keys.items():
        scales[which][entry, :, key] = bad
    scales[which][1, :, 60:] = bad
    out = attention(q, k, v, causal=True, kv_lengths=lengths, **scales)
    expected = attention(q, k, v, causal=True, kv_lengths=lengths, **clean)
    for entry, key in bad_keys.items():
        first_keeping = key - (int(lengths[entry]) - lq)  # query i sits at length - Lq + i
        np.testing.assert_array_equal(
            out[entry, :, :first_keeping], expected[entry, :, :first_keeping]
        )
        if np.isnan(bad):  # (an inf k scale may make a score -inf: that key then weighs 0)
            assert not np.isfinite(out[entry, :, first_keeping:]).all(axis=-1).any()
