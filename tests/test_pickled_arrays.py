"""Arrays that arrive through pickle protocol 5 (how dask.distributed, multiprocessing and Ray
hand NumPy arrays to a worker) carry dtypes equal to, but not identical with, NumPy's own: every
dtype check compares by equality, so they compute exactly like the originals."""

import pickle

import ml_dtypes
import numpy as np
import pytest

import cpuattn

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


def roundtrip(x):
    return pickle.loads(pickle.dumps(x, protocol=5))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_pickled_inputs_compute_like_the_originals(rng, dtype, backend):
    q, k, v = (rng.standard_normal((2, 4, 9, 16)).astype(dtype) for _ in range(3))
    bool_mask = rng.random((2, 1, 9, 9)) > 0.3
    float_mask = np.where(bool_mask, 0.0, -np.inf).astype(
        np.float64 if dtype == np.float64 else np.float32
    )
    kv_lengths = np.array([9, 5], dtype=np.int64)
    for options in (
        {},
        {"mask": bool_mask},
        {"mask": float_mask},
        {"kv_lengths": kv_lengths, "causal": True},
    ):
        expected = cpuattn.attention(q, k, v, backend=backend, **options)
        pickled = {name: roundtrip(x) for name, x in options.items() if isinstance(x, np.ndarray)}
        got = cpuattn.attention(
            *(roundtrip(x) for x in (q, k, v)), backend=backend, **{**options, **pickled}
        )
        np.testing.assert_array_equal(got, expected)


def test_pickled_dtypes_are_equal_not_identical():
    x = roundtrip(np.zeros(4, np.float32))
    assert x.dtype == np.float32
    # What made the native backend refuse them: dtype objects compared by identity.
    assert x.dtype is not np.dtype(np.float32)


def misaligned(x: np.ndarray) -> np.ndarray:
    """A copy of x at an address one byte off its alignment (as dask.distributed delivers
    small arrays sent inline in a message)."""
    raw = np.zeros(x.nbytes + 1, np.uint8)
    y = np.frombuffer(raw.data, x.dtype, x.size, offset=1).reshape(x.shape)
    y[...] = x
    assert not y.flags.aligned
    return y


@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_misaligned_small_arrays_compute_like_aligned_ones(rng, backend):
    q, k, v = (rng.standard_normal((2, 4, 9, 16)).astype(np.float32) for _ in range(3))
    slopes = rng.random((2, 4)).astype(np.float32)
    lengths = np.array([9, 4])
    expected = cpuattn.attention(
        q, k, v, alibi_slopes=slopes, kv_lengths=lengths, causal=True, backend=backend
    )
    got = cpuattn.attention(
        *(misaligned(x) for x in (q, k, v)),
        alibi_slopes=misaligned(slopes),
        kv_lengths=misaligned(lengths),
        causal=True,
        backend=backend,
    )
    np.testing.assert_array_equal(got, expected)
    w = rng.standard_normal(16).astype(np.float32)
    expected = cpuattn.additive_attention(q, k, v, w, backend=backend)
    np.testing.assert_array_equal(
        cpuattn.additive_attention(q, k, v, misaligned(w), backend=backend), expected
    )
