"""Bad input: a ValueError/TypeError that names the argument, never a crash."""

import numpy as np
import pytest

import cpuattn

F32 = np.float32


def qkv(batch=(2,), hq=4, hkv=2, lq=5, lk=7, d=8, dv=8, dtype=F32):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((*batch, hq, lq, d)).astype(dtype),
        rng.standard_normal((*batch, hkv, lk, d)).astype(dtype),
        rng.standard_normal((*batch, hkv, lk, dv)).astype(dtype),
    )


@pytest.fixture(params=["native", "numpy"])
def backend(request):
    if request.param == "native" and not cpuattn.info()["native"]:
        pytest.skip("native backend not built")
    return request.param


def raises(backend, exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        cpuattn.attention(*args, backend=backend, **kw)


def test_wrong_ndim(backend):
    q, k, v = qkv()
    raises(backend, ValueError, r"q: expected", q[0, 0, 0], k, v)
    raises(backend, ValueError, r"k: expected 4 dims", q, k[0], v)
    raises(backend, ValueError, r"v: expected 4 dims", q, k, v[None])
    raises(backend, ValueError, r"q: expected", np.float32(1.0), k, v)


def test_head_dim_mismatch(backend):
    q, k, v = qkv()
    raises(
        backend,
        ValueError,
        r"k: expected \(\.\.\., Hkv, Lk, 8\) to match q's head dim 8",
        q,
        k[..., :4],
        v,
    )


def test_lk_mismatch_between_k_and_v(backend):
    q, k, v = qkv()
    raises(backend, ValueError, r"v: expected \(\.\.\., 2, 7, Dv\)", q, k, v[..., :6, :])
    raises(backend, ValueError, r"v: expected \(\.\.\., 2, 7, Dv\)", q, k, v[:, :1])


def test_axes_past_2_to_the_60_are_refused(backend):
    """Only zero-stride views are this long; past 2**60, a far diagonal plus a window side
    overflowed int64 in the native key bounds and dropped a kept key (found in review)."""
    from numpy.lib.stride_tricks import as_strided

    long = as_strided(np.full(1, 3.0, np.float16), shape=(1, 1, 2**62 - 1, 1), strides=(0,) * 4)
    one = np.ones((1, 1, 1, 1), F32)
    options = {"kv_lengths": np.array([1]), "diagonal": 2**61, "window": (2**62, 2**62 + 2**61)}
    raises(backend, ValueError, r"k: expected Lk <= 2\*\*60, got 4611686018427387903",
           one, long, long, **options)  # fmt: skip
    raises(backend, ValueError, r"q: expected Lq <= 2\*\*60", long, *[one.astype(np.float16)] * 2)
    edge = as_strided(np.full(1, 3.0, np.float16), shape=(1, 1, 2**60, 1), strides=(0,) * 4)
    out = cpuattn.attention(one, edge, edge, backend=backend, **options)
    np.testing.assert_array_equal(out, [[[[3.0]]]])


def test_ragged_lists_and_int8_gradients_name_the_argument(backend):
    q, k, v = qkv()
    raises(backend, ValueError, r"^q: not an array", [[1.0, 2.0], [3.0]], k, v)
    raises(backend, ValueError, r"^v: not an array", q, k, [[1.0], []])
    k8 = np.ones(k.shape, np.int8)
    with pytest.raises(TypeError, match=r"^k: int8 K/V caches are for inference"):
        cpuattn.attention_backward(q, q, k8, k8, q, np.zeros(q.shape[:-1], F32), backend=backend)


def test_heads_not_divisible(backend):
    q, k, v = qkv(hq=4, hkv=3)
    with pytest.raises(ValueError, match=r"k: its 3 kv heads must divide q's 4 heads") as info:
        cpuattn.attention(q, k, v, backend=backend)
    assert "swapaxes" not in str(info.value)  # (L, H) swapped would not divide either


def test_heads_not_divisible_hints_at_a_b_l_h_d_layout(backend):
    """q, k, v in (B, L, H, D): read as Hq = Lq = 5 and Hkv = Lk = 7, which do not divide,
    while the real heads (4, 2) do: the message suggests the view that fixes it."""
    q, k, v = (x.swapaxes(-2, -3) for x in qkv(hq=4, hkv=2, lq=5, lk=7))
    raises(
        backend,
        ValueError,
        r"k: its 7 kv heads must divide q's 5 heads .*\(B, L, H, D\).*swapaxes\(-2, -3\)",
        q,
        k,
        v,
    )


def test_batch_dims_differ(backend):
    q, k, v = qkv(batch=(2, 3))
    raises(
        backend,
        ValueError,
        r"k: batch dims \(2, 2\) differ from q's \(2, 3\)",
        q,
        k[:, :2],
        v[:, :2],
    )


@pytest.mark.parametrize(
    "shape", [(3, 7), (2, 4, 6, 7), (6, 7), (5, 8), (1, 1, 2, 4, 5, 7)], ids=str
)
def test_mask_does_not_broadcast(backend, shape):
    q, k, v = qkv()
    raises(
        backend,
        ValueError,
        r"mask: shape .* does not broadcast to \(\*batch, Hq, Lq, Lk\)"
        r" = \(2, 4, 5, 7\)",
        q,
        k,
        v,
        mask=np.ones(shape, bool),
    )


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.complex64, object])
def test_mask_bad_dtype(backend, dtype):
    q, k, v = qkv()
    raises(backend, TypeError, r"mask: expected bool", q, k, v, mask=np.ones((5, 7), dtype))


@pytest.mark.parametrize(
    ("lengths", "exc", "match"),
    [
        ([7, 8], ValueError, r"kv_lengths: values must lie in \[0, Lk\] = \[0, 7\]"),
        ([-1, 3], ValueError, r"kv_lengths: values must lie in"),
        ([1, 2, 3], ValueError, r"kv_lengths: expected shape \*batch = \(2,\)"),
        ([[1, 2]], ValueError, r"kv_lengths: expected shape"),
        ([1.0, 2.0], TypeError, r"kv_lengths: expected integers"),
        ([True, False], TypeError, r"kv_lengths: expected integers"),
    ],
)
def test_kv_lengths_invalid(backend, lengths, exc, match):
    q, k, v = qkv()
    raises(backend, exc, match, q, k, v, kv_lengths=lengths)


def test_kv_lengths_of_3d_inputs_say_there_is_no_batch_axis(backend):
    q, k, v = qkv(batch=())
    raises(
        backend,
        ValueError,
        r"kv_lengths: expected shape \*batch = \(\), got \(2,\): q, k and v \(\(H, L, D\) "
        r"or \(L, D\)\) have no batch axis",
        q,
        k,
        v,
        kv_lengths=[3, 4],
    )


@pytest.mark.parametrize(
    ("batch", "slopes", "match"),
    [
        ((), (3,), r"alibi_slopes: expected shape \(Hq,\) = \(4,\), got \(3,\)$"),
        (
            (2,),
            (3,),
            (
                r"alibi_slopes: expected shape \(Hq,\) or \(\*batch, Hq\) = \(4,\) or \(2, 4\), "
                r"got \(3,\)$"
            ),
        ),
    ],
    ids=["no-batch", "batch"],
)
def test_alibi_slopes_shape_message(backend, batch, slopes, match):
    q, k, v = qkv(batch=batch)
    raises(backend, ValueError, match, q, k, v, alibi_slopes=np.ones(slopes))


# The rule (attention's docstring, Raises): TypeError for a wrong type, ValueError for a right
# type with a wrong value. bools are not ints here.
@pytest.mark.parametrize("window", [(-2, 0), (0, -5), (1,), (1, 2, 3)], ids=str)
def test_window_bad_value(backend, window):
    q, k, v = qkv()
    raises(backend, ValueError, r"window(\[[01]\])?: expected", q, k, v, window=window)


@pytest.mark.parametrize(
    "window",
    [5, (1.5, 2), (3.0, 0), (True, 1), (0, np.True_), "ab", (None, 0), (np.array([3]), 0)],
    ids=str,
)
def test_window_bad_type(backend, window):
    q, k, v = qkv()
    raises(backend, TypeError, r"window(\[[01]\])?: expected", q, k, v, window=window)


@pytest.mark.parametrize(
    ("causal", "exc"),
    [("causal", ValueError), ("top-left", ValueError), (1, TypeError), (None, TypeError)],
    ids=str,
)
def test_causal_invalid(backend, causal, exc):
    q, k, v = qkv()
    raises(
        backend,
        exc,
        r"causal: expected False, True, 'bottom_right' or 'top_left'",
        q,
        k,
        v,
        causal=causal,
    )


def test_numpy_scalars_and_0d_arrays_work_like_python_numbers(backend):
    q, k, v = qkv()
    kw = {"scale": 0.25, "softcap": 30.0, "window": (3, 0), "num_threads": 2}
    expected = cpuattn.attention(q, k, v, backend=backend, **kw)
    numpy_kw = {
        "scale": np.array(0.25),
        "softcap": np.float32(30),
        "window": (np.int64(3), np.array(0)),
        "num_threads": np.int32(2),
    }
    got = cpuattn.attention(q, k, v, backend=backend, **numpy_kw)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"scale": np.array([0.25])}, TypeError, r"scale: expected a real number"),
        ({"scale": np.array(True)}, TypeError, r"scale: expected a real number"),
        ({"scale": np.array(np.inf)}, ValueError, r"scale: expected a finite number"),
        ({"softcap": "30"}, TypeError, r"softcap: expected a positive number"),
        ({"softcap": np.True_}, TypeError, r"softcap: expected a positive number"),
        ({"softcap": np.float32(-1)}, ValueError, r"softcap: expected a positive finite"),
        ({"num_threads": np.array(2.0)}, TypeError, r"num_threads: expected a positive int"),
        ({"num_threads": np.int64(0)}, ValueError, r"num_threads: expected a positive int"),
    ],
    ids=str,
)
def test_scalar_arguments_follow_the_type_value_rule(backend, kw, exc, match):
    q, k, v = qkv()
    raises(backend, exc, match, q, k, v, **kw)


@pytest.mark.parametrize(
    "dtype",
    [
        np.int32,
        np.int64,
        np.complex64,
        np.complex128,
        np.bool_,
        object,
        np.float128 if hasattr(np, "float128") else object,
    ],
)
def test_unsupported_dtypes(backend, dtype):
    q, k, v = qkv()
    raises(
        backend,
        TypeError,
        r"q: expected a float32, float64, float16 or bfloat16 array, "
        r"got dtype",
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
    )


def test_mixed_dtypes(backend):
    q, k, v = qkv()
    raises(
        backend,
        TypeError,
        r"k: dtype float64 does not go with q's float32",
        q,
        k.astype(np.float64),
        v.astype(np.float64),
    )
    raises(
        backend, TypeError, r"v: dtype float64 differs from k's float32", q, k, v.astype(np.float64)
    )
    raises(
        backend,
        TypeError,
        r"k: dtype float32 does not go with q's float16",
        q.astype(np.float16),
        k,
        v,
    )
    raises(
        backend,
        TypeError,
        r"k: dtype float16 does not go with q's float64",
        q.astype(np.float64),
        k.astype(np.float16),
        v.astype(np.float16),
    )


def test_out_dtype_invalid(backend):
    q, k, v = qkv()
    raises(
        backend,
        TypeError,
        r"out_dtype: expected None, float16 or float32",
        q.astype(np.float16),
        k.astype(np.float16),
        v.astype(np.float16),
        out_dtype=np.float64,
    )
    # One allowed output dtype is listed once, not as "None, float32 or float32".
    raises(
        backend,
        TypeError,
        r"out_dtype: expected None or float32 for float32 inputs, got float64$",
        q,
        k,
        v,
        out_dtype=np.float64,
    )
    raises(
        backend,
        TypeError,
        r"out: expected dtype float32 \(q's dtype, or out_dtype\)",
        q.astype(np.float16),
        k.astype(np.float16),
        v.astype(np.float16),
        out_dtype=np.float32,
        out=np.empty(q.shape[:-1] + (8,), np.float16),
    )


def test_out_invalid(backend):
    q, k, v = qkv()
    raises(
        backend,
        ValueError,
        r"out: expected shape \(\*batch, Hq, Lq, Dv\) = \(2, 4, 5, 8\)",
        q,
        k,
        v,
        out=np.empty((2, 4, 5, 7), F32),
    )
    raises(
        backend,
        TypeError,
        r"out: expected dtype float32",
        q,
        k,
        v,
        out=np.empty((2, 4, 5, 8), np.float64),
    )
    read_only = np.empty((2, 4, 5, 8), F32)
    read_only.flags.writeable = False
    raises(backend, ValueError, r"out: array is read-only", q, k, v, out=read_only)
    raises(backend, TypeError, r"out: expected a numpy.ndarray", q, k, v, out=[1, 2])


@pytest.mark.parametrize(
    ("scale", "exc"),
    [
        ("1", TypeError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        (1j, TypeError),
    ],
    ids=str,
)
def test_scale_invalid(backend, scale, exc):
    q, k, v = qkv()
    raises(backend, exc, r"scale: expected", q, k, v, scale=scale)


@pytest.mark.parametrize(
    ("threads", "exc"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)],
    ids=str,
)
def test_num_threads_invalid(backend, threads, exc):
    q, k, v = qkv()
    raises(backend, exc, r"num_threads: expected a positive int", q, k, v, num_threads=threads)


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(
        ValueError,
        match=r"backend: expected one of \('auto', 'native', "
        r"'numpy'\), got 'cuda'",
    ):
        cpuattn.attention(q, k, v, backend="cuda")
    with pytest.raises(TypeError, match=r"backend: expected one of .*, got 1"):
        cpuattn.attention(q, k, v, backend=1)


def test_merge_invalid():
    out = np.zeros((3, 4), F32)
    lse = np.zeros(3, F32)
    with pytest.raises(ValueError, match=r"merge: expected equally many"):
        cpuattn.merge([out], [])
    with pytest.raises(ValueError, match=r"outs\[1\]: expected shape \(3, 4\)"):
        cpuattn.merge([out, np.zeros((3, 5), F32)], [lse, lse])
    with pytest.raises(ValueError, match=r"lses\[0\]: expected a floating array of shape \(3,\)"):
        cpuattn.merge([out], [np.zeros(4, F32)])
    with pytest.raises(TypeError, match=r"outs\[0\]: expected a floating array"):
        cpuattn.merge([np.zeros((3, 4), int)], [lse])
    with pytest.raises(ValueError, match=r"outs\[0\]: expected shape \(\.\.\., Lq, Dv\)"):
        cpuattn.merge([np.float32(1.0)], [lse])


def test_core_rejects_unvalidated_arguments():
    """The binding's own checks: the C++ side never trusts its caller."""
    if not cpuattn.info()["native"]:
        pytest.skip("native backend not built")
    from cpuattn import _core

    q, k, v = qkv()
    out = np.empty((2, 4, 5, 8), F32)
    args = (None, None, None, 1.0, False, 0, -1, -1, 0, 0.0, None, None)
    with pytest.raises(ValueError, match="kv_lengths values must lie in"):
        _core.attention(q, k, v, out, None, None, np.array([9, 1]), *args[3:])
    with pytest.raises(ValueError, match="unit-stride"):
        _core.attention(q[..., ::2], k[..., ::2], v, np.empty((2, 4, 5, 8), F32), *args)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _core.attention(q, k, v, out, *args)
    with pytest.raises(ValueError, match="wrong shape"):
        _core.attention(q, k, v[:, :, :3], np.empty((2, 4, 5, 8), F32), *args)
    with pytest.raises(TypeError, match="k and v dtypes differ"):
        _core.attention(q, k.astype(np.float64), v, np.empty((2, 4, 5, 8), F32), *args)
    with pytest.raises(TypeError, match="do not go together"):
        _core.attention(q, k.astype(np.float64), v.astype(np.float64), out, *args)
    with pytest.raises(ValueError, match="softcap must be"):
        _core.attention(q, k, v, np.empty((2, 4, 5, 8), F32), *args[:-3], -1.0, None, None)
    with pytest.raises(ValueError, match="alibi has the wrong shape"):
        _core.attention(q, k, v, np.empty((2, 4, 5, 8), F32), *args[:-2], np.ones(3, F32), None)
    with pytest.raises(ValueError, match="additive_w has the wrong shape"):
        _core.attention(q, k, v, np.empty((2, 4, 5, 8), F32), *args[:-1], np.ones(3, F32))
    q3, k3, v3 = qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        _core.attention(q3, k3, v3, np.empty((2, 3, 5, 8), F32), *args)
