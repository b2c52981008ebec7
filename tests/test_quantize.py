"""quantize_int8 / dequantize_int8: against the formula in float32, the scale/2 bound, errors."""

import doctest

import ml_dtypes
import numpy as np
import pytest

from cpuattn import _quantize
from cpuattn._quantize import dequantize_int8, quantize_int8

F32 = np.float32
BF16 = ml_dtypes.bfloat16
DTYPES = [np.float64, np.float32, np.float16, BF16]
SHAPES = [(7,), (3, 16), (2, 3, 5, 64), (0, 8), (4, 0), (2, 0, 3), (1, 1)]


def expected(x):
    """The documented formula, row by row in plain NumPy."""
    x = np.asarray(x).astype(F32)
    amax = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], F32)
    scales = (amax / F32(127)).astype(F32)
    q = np.zeros(x.shape, np.int8)
    for idx in np.ndindex(x.shape[:-1]):
        if scales[idx] > 0:
            q[idx] = np.clip(np.rint(x[idx] / scales[idx]), -127, 127)
    return q, scales


def check_bound(x, q, scales):
    x32 = np.asarray(x).astype(F32)
    err = np.abs(dequantize_int8(q, scales) - x32)
    # scale/2 from rounding, plus float32 rounding of x / scale and of q * scale.
    assert np.all(err <= scales[..., None] * (0.5 + 1e-5) + 1e-30)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_the_formula_and_the_bound(rng, shape, dtype):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100, shape[:-1] + (1,))).astype(dtype)
    q, scales = quantize_int8(x)
    assert q.dtype == np.int8
    assert q.shape == x.shape
    assert scales.dtype == F32
    assert scales.shape == x.shape[:-1]
    want_q, want_scales = expected(x)
    assert np.array_equal(scales, want_scales)
    assert np.array_equal(q, want_q)
    check_bound(x, q, scales)
    if x.size:  # the largest |x| of each row maps to +-127
        assert np.all(np.abs(q.astype(int)).max(axis=-1) == 127)


@pytest.mark.parametrize(
    "view",
    [lambda a: a[:, ::2], lambda a: a.T, lambda a: a[::-1, 1::3], lambda a: a[:, None, :]],
    ids=["step2", "transposed", "reversed", "new-axis"],
)
def test_any_strides(rng, view):
    x = view(rng.standard_normal((6, 12)).astype(F32))
    q, scales = quantize_int8(x)
    want_q, want_scales = expected(np.ascontiguousarray(x))
    assert np.array_equal(q, want_q)
    assert np.array_equal(scales, want_scales)
    assert q.flags.c_contiguous


def test_zero_rows_give_scale_0_and_q_0(rng):
    x = rng.standard_normal((5, 9)).astype(F32)
    x[[1, 3]] = 0
    x[4] = -0.0
    q, scales = quantize_int8(x)  # warnings are errors here: no 0/0
    assert np.array_equal(scales[[1, 3, 4]], np.zeros(3, F32))
    assert not q[[1, 3, 4]].any()
    assert np.all(scales[[0, 2]] > 0)
    assert np.array_equal(dequantize_int8(q, scales)[[1, 3, 4]], np.zeros((3, 9), F32))


def test_tiny_rows_whose_scale_underflows_give_0():
    x = np.array([[1e-44, -1e-45], [1e-40, -3e-41]], F32)  # subnormals
    q, scales = quantize_int8(x)
    assert scales[0] == 0
    assert not q[0].any()
    assert scales[1] > 0
    assert q[1, 0] == 127


def test_float64_is_rounded_to_float32_first():
    x = np.array([1.0 + 1e-12, 0.5, -1.0])
    q, scales = quantize_int8(x)
    assert scales == F32(1.0) / F32(127)
    assert q.tolist() == [127, 64, -127]


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (np.ones((2, 3), np.int32), TypeError, r"x: expected a float32, .* got dtype int32"),
        (np.ones((2, 3), np.int8), TypeError, r"x: expected a float32, .* got dtype int8"),
        (np.ones(3, np.complex64), TypeError, r"x: expected a float32, .* got dtype complex64"),
        (np.array(["a", "b"]), TypeError, r"x: expected a float32, .* got dtype <U1"),
        (np.float32(2.0), ValueError, r"x: expected at least 1 dim .* 0-d"),
        (np.array([[1.0, np.nan]], F32), ValueError, r"x: expected finite values .* got 1"),
        (np.array([np.inf, -np.inf], np.float16), ValueError, r"x: expected finite .* got 2"),
        (np.array([1.0, 1e39]), ValueError, r"x: expected finite values \(within float32"),
    ],
    ids=["int32", "int8", "complex", "str", "0-d", "nan", "inf-f16", "beyond-f32"],
)
def test_quantize_errors(x, exc, match):
    with pytest.raises(exc, match=match):
        quantize_int8(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dequantize_dtype_is_the_float32_product_cast(rng, dtype):
    q = rng.integers(-127, 128, (3, 4, 8)).astype(np.int8)
    scales = rng.uniform(0, 1, (3, 4)).astype(F32)
    want = q.astype(F32) * scales[..., None]
    got = dequantize_int8(q, scales, dtype=dtype)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, want.astype(dtype))
    other = scales.astype(dtype)  # scales of any float dtype are cast to float32 first
    want = q.astype(F32) * other.astype(F32)[..., None]
    assert np.array_equal(dequantize_int8(q, other), want)


def test_dequantize_empty_and_float64_scales():
    assert dequantize_int8(np.zeros((2, 0), np.int8), np.ones(2)).shape == (2, 0)
    assert dequantize_int8(np.zeros((0, 3), np.int8), np.ones(0, F32)).shape == (0, 3)
    got = dequantize_int8(np.array([2, -3], np.int8), np.array(0.25))  # 1-d q: 0-d scales
    assert got.tolist() == [0.5, -0.75]


@pytest.mark.parametrize(
    ("q", "scales", "kw", "exc", "match"),
    [
        (np.ones((2, 3), np.int16), np.ones(2, F32), {}, TypeError, r"q: expected an int8 .*int16"),
        (np.ones((2, 3)), np.ones(2, F32), {}, TypeError, r"q: expected an int8 .*float64"),
        (np.ones((2, 3), np.int8), np.ones(2, np.int32), {}, TypeError, r"scales: .*int32"),
        (np.ones((2, 3), np.int8), np.ones(3, F32), {}, ValueError, r"\(2,\), got \(3,\)"),
        (np.ones((2, 3), np.int8), np.ones((2, 1), F32), {}, ValueError, r"scales: expected"),
        (np.int8(3), np.ones(()), {}, ValueError, r"q: expected at least 1 dim"),
        (np.ones(3, np.int8), np.ones(()), {"dtype": np.int8}, TypeError, r"dtype: .*got int8"),
    ],
    ids=["int16-q", "float-q", "int-scales", "scales-shape", "scales-ndim", "0-d", "dtype"],
)
def test_dequantize_errors(q, scales, kw, exc, match):
    with pytest.raises(exc, match=match):
        dequantize_int8(q, scales, **kw)


def test_docstring_examples():
    failures, tried = doctest.testmod(_quantize, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 2
    assert failures == 0
