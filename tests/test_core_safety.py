"""The compiled _core on its own is memory-safe: called directly, with no Python validation in
front, bad offsets and views that reach outside their memory give a clean ValueError, and
kv_lengths / cu_seqlens changed by another thread during a call cannot make the C++ read out of
bounds (the binding validates a private copy, then releases the GIL)."""

import mmap
import threading
import warnings

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided, sliding_window_view
from reference import dense_attention

from cpuattn import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason="native backend not built")

F32 = np.float32
B, HQ, HKV, LQ, LK, D, DV = 2, 4, 2, 5, 70, 8, 8


def core(
    q,
    k,
    v,
    out,
    *,
    lse=None,
    mask=None,
    kv_lengths=None,
    alibi=None,
    additive_w=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    causal=False,
):
    """_native._core.attention with the defaults of a plain call."""
    return _native._core.attention(
        q,
        k,
        v,
        out,
        lse,
        mask,
        kv_lengths,
        0.5,
        causal,
        0,
        -1,
        -1,
        0,
        0.0,
        alibi,
        additive_w,
        cu_seqlens_q,
        cu_seqlens_k,
    )


@pytest.fixture
def qkv(rng):
    q = rng.standard_normal((B, HQ, LQ, D)).astype(F32)
    k = rng.standard_normal((B, HKV, LK, D)).astype(F32)
    v = rng.standard_normal((B, HKV, LK, DV)).astype(F32)
    return q, k, v


def out_array():
    return np.empty((B, HQ, LQ, DV), F32)


def one_short(a):
    """A view with a's shape and C strides over a buffer one element shorter than that."""
    return as_strided(np.zeros(a.size - 1, a.dtype), shape=a.shape, strides=a.strides)


# ---- views that reach outside their memory ----


@pytest.mark.parametrize("operand", ["q", "k", "v", "out"])
def test_view_past_the_end_of_its_buffer(qkv, operand):
    q, k, v = qkv
    args = {"q": q, "k": k, "v": v, "out": out_array()}
    args[operand] = one_short(args[operand])
    with pytest.raises(ValueError, match=f"{operand} reaches outside the memory it views"):
        core(**args)


def test_view_before_the_start_of_its_buffer(qkv):
    q, k, v = qkv
    # A negative stride from the first element: rows before the buffer.
    below = as_strided(k, shape=k.shape, strides=(*k.strides[:2], -k.strides[2], k.strides[3]))
    with pytest.raises(ValueError, match="k reaches outside the memory it views"):
        core(q, below, v, out_array())


def test_view_whose_extent_overflows(qkv):
    q, _, _ = qkv
    # Strides whose extent overflows int64: the check must not wrap around to "inside".
    lk = 2**31
    k = as_strided(np.zeros(D, F32), (B, HKV, lk, D), (2**62, 2**62, 2**33, 4))
    v = as_strided(np.zeros(DV, F32), (B, HKV, lk, DV), (0, 0, 0, 4))  # inside its memory
    with pytest.raises(ValueError, match="k reaches outside the memory it views"):
        core(q, k, v, out_array())


@pytest.mark.parametrize("operand", ["lse", "mask", "alibi", "additive_w", "kv_lengths"])
def test_other_arrays_past_the_end_of_their_buffer(qkv, operand):
    q, k, v = qkv
    kw = {
        "lse": as_strided(np.empty(B * HQ * LQ - 1, F32), (B, HQ, LQ), (HQ * LQ * 4, LQ * 4, 4)),
        "mask": as_strided(np.ones(LK, bool), (B, HQ, LQ, LK), (0, 0, 1, 1)),
        "alibi": as_strided(np.ones(HQ, F32), (B, HQ), (HQ * 4, 4)),
        "additive_w": as_strided(np.ones(D - 1, F32), (D,), (4,)),
        "kv_lengths": as_strided(np.full(1, LK, np.int64), (B,), (8,)),
    }
    with pytest.raises(ValueError, match=f"{operand} reaches outside the memory it views"):
        core(q, k, v, out_array(), **{operand: kw[operand]})


# ---- views that stay inside their memory still work ----


def test_views_inside_their_memory_are_accepted(qkv):
    q, k, v = qkv
    want = dense_attention(q, k, v, scale=0.5)[0]
    # k's rows again, through sliding_window_view (as_strided), inside k's memory.
    k_view = sliding_window_view(k.reshape(-1), D)[::D].reshape(k.shape)
    assert np.shares_memory(k_view, k)
    assert k_view.base is not None
    out = out_array()
    core(q, k_view, v, out)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    # Memory owned by other objects: a bytearray, an mmap; a broadcast (stride 0) mask.
    v_bytes = np.frombuffer(bytearray(v.tobytes()), F32).reshape(v.shape)
    m = mmap.mmap(-1, q.nbytes)
    q_mapped = np.frombuffer(m, F32).reshape(q.shape)
    q_mapped[...] = q
    mask = np.broadcast_to(np.ones(LK, bool), (B, HQ, LQ, LK))
    out = out_array()
    core(q_mapped, k, v_bytes, out, mask=mask)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
    del q_mapped
    m.close()


def test_view_past_the_end_of_a_bytes_buffer(qkv):
    q, k, v = qkv
    data = v.tobytes()[:-4]  # one float short
    short = np.frombuffer(data, F32)
    v_view = as_strided(short, shape=v.shape, strides=v.strides)
    with pytest.raises(ValueError, match="v reaches outside the memory it views"):
        core(q, k, v_view, out_array())


# ---- bad offsets ----


@pytest.mark.parametrize("lengths", [[LK + 1, 3], [-1, 3], [2**62, 0]])
def test_bad_kv_lengths(qkv, lengths):
    q, k, v = qkv
    with pytest.raises(ValueError, match="kv_lengths values must lie in"):
        core(q, k, v, out_array(), kv_lengths=np.array(lengths, np.int64))


def test_kv_lengths_of_a_wrong_type_or_shape(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="kv_lengths must be int64"):
        core(q, k, v, out_array(), kv_lengths=np.array([3, 3], np.int32))
    with pytest.raises(ValueError, match="kv_lengths has the wrong shape"):
        core(q, k, v, out_array(), kv_lengths=np.array([3, 3, 3], np.int64))


def packed(rng, lq=(3, 4), lk=(5, 6)):
    q = rng.standard_normal((HQ, sum(lq), D)).astype(F32)
    k = rng.standard_normal((HKV, sum(lk), D)).astype(F32)
    v = rng.standard_normal((HKV, sum(lk), DV)).astype(F32)
    out = np.empty((HQ, sum(lq), DV), F32)
    cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int64)
    return q, k, v, out, cu_q, cu_k


@pytest.mark.parametrize(
    ("which", "offsets", "match"),
    [
        ("q", [0, 3, 8], "must run from 0 to the total length"),
        ("q", [1, 3, 7], "must run from 0 to the total length"),
        ("k", [0, 12, 11], "must be non-decreasing"),
        ("k", [0, -5, 11], "must be non-decreasing"),
        ("k", [0, 11], "differ in length"),
        ("q", [7], "must run from 0 to the total length"),
    ],
)
def test_bad_cu_seqlens(rng, which, offsets, match):
    q, k, v, out, cu_q, cu_k = packed(rng)
    bad = np.array(offsets, np.int64)
    if which == "q":
        cu_q = bad
    else:
        cu_k = bad
    with pytest.raises(ValueError, match=match):
        core(q, k, v, out, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_cu_seqlens_past_the_end_of_its_buffer(rng):
    q, k, v, out, cu_q, _ = packed(rng)
    short = as_strided(np.array([0, 5], np.int64), shape=(3,), strides=(8,))
    with pytest.raises(ValueError, match="cu_seqlens_k reaches outside the memory it views"):
        core(q, k, v, out, cu_seqlens_q=cu_q, cu_seqlens_k=short)


# ---- values changed by another Python thread while the GIL is released ----


def toggle_while(calls, array, index, good, bad):
    """Runs `calls()` while another thread keeps flipping array[index] between good and bad.
    Returns the results of the calls that were not rejected."""
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            array[index] = bad
            array[index] = good

    thread = threading.Thread(target=writer)
    thread.start()
    results = []
    try:
        for _ in range(60):
            try:
                results.append(calls())
            except ValueError:
                pass
    finally:
        stop.set()
        thread.join()
    return results


def test_kv_lengths_written_during_the_call(rng):
    lk = 2048  # many key tiles: the call runs long enough for the writer to get the GIL
    q = rng.standard_normal((2, 2, 64, 16)).astype(F32)
    k = rng.standard_normal((2, 2, lk, 16)).astype(F32)
    v = rng.standard_normal((2, 2, lk, 16)).astype(F32)
    lengths = np.array([lk, 100], np.int64)
    want = dense_attention(q, k, v, scale=0.5, kv_lengths=[lk, 100])[0]

    def call():
        out = np.empty((2, 2, 64, 16), F32)
        core(q, k, v, out, kv_lengths=lengths)
        return out

    for out in toggle_while(call, lengths, 0, lk, 2**40):
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


def test_cu_seqlens_written_during_the_call(rng):
    q, k, v, _, cu_q, cu_k = packed(rng, lq=(64, 64), lk=(1000, 1000))
    want = np.concatenate(
        [
            dense_attention(q[:, :64], k[:, :1000], v[:, :1000], scale=0.5)[0],
            dense_attention(q[:, 64:], k[:, 1000:], v[:, 1000:], scale=0.5)[0],
        ],
        axis=1,
    )

    def call():
        out = np.empty((HQ, 128, DV), F32)
        core(q, k, v, out, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        return out

    for out in toggle_while(call, cu_k, 1, 1000, -(2**40)):
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)


# ---- owners that describe no memory (review findings) ----


@pytest.mark.parametrize("operand", ["k", "out"])
def test_view_of_an_empty_owner_with_made_up_strides(qkv, operand):
    q, k, v = qkv
    args = {"q": q, "k": k, "v": v, "out": out_array()}
    # NumPy lets anyone set an empty array's strides: its "extent" then says nothing about
    # the (1-byte) allocation behind it.
    owner = np.empty((0, 1 << 20), F32)
    with warnings.catch_warnings():  # deprecated in NumPy 2.4, still possible
        warnings.simplefilter("ignore", DeprecationWarning)
        owner.strides = (1 << 30, 4)
    target = args[operand]
    args[operand] = as_strided(owner, target.shape, (0, 0, -(1 << 20), 4))
    with pytest.raises(ValueError, match=f"{operand} reaches outside the memory it views"):
        core(**args)


def test_view_of_an_empty_owner(qkv):
    q, k, v = qkv
    out = as_strided(np.empty(0, F32), (B, HQ, LQ, DV), (0, 0, 0, 4))
    with pytest.raises(ValueError, match="out reaches outside the memory it views"):
        core(q, k, v, out)


def array_with_null_base(backing):
    """An ndarray over backing's memory whose base is NULL, as the C API (PyArray_New without a
    base, e.g. SWIG's ARGOUTVIEW) makes it: foreign memory that only its maker can bound."""
    import ctypes

    capsule = np._core._multiarray_umath._ARRAY_API
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    table = ctypes.cast(get(capsule, None), ctypes.POINTER(ctypes.c_void_p))
    ssize_p = ctypes.POINTER(ctypes.c_ssize_t)
    new = ctypes.PYFUNCTYPE(
        ctypes.py_object,
        ctypes.c_void_p,
        ctypes.c_int,
        ssize_p,
        ctypes.c_int,
        ssize_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_void_p,
    )(table[93])  # PyArray_New
    dims = (ctypes.c_ssize_t * backing.ndim)(*backing.shape)
    strides = (ctypes.c_ssize_t * backing.ndim)(*backing.strides)
    writeable = 0x0400
    return new(
        table[2],  # &PyArray_Type
        backing.ndim,
        dims,
        backing.dtype.num,
        strides,
        backing.ctypes.data,
        0,
        writeable,
        None,
    )


def test_array_with_a_null_base_is_bounded_by_itself(qkv):
    q, k, v = qkv
    foreign = array_with_null_base(q)
    assert foreign.base is None
    assert not foreign.flags.owndata
    np.testing.assert_array_equal(foreign, q)
    out, expected = out_array(), out_array()
    core(foreign, k, v, out)
    core(q, k, v, expected)
    np.testing.assert_array_equal(out, expected)


def test_window_sides_past_any_distance_are_unbounded(qkv):
    q, k, v = qkv
    huge = 2**63 - 1
    out, expected = out_array(), out_array()
    args = (None, None, None, 0.5, False, 0)
    _native._core.attention(q, k, v, out, *args, huge, huge, 0, 0.0, None, None)
    _native._core.attention(q, k, v, expected, *args, -1, -1, 0, 0.0, None, None)
    np.testing.assert_array_equal(out, expected)


def test_int8_q_or_out_is_refused_with_int8_k_and_v():
    """int8 is a K/V storage type only: an int8 q (read as float32 by the query stage) or out
    would be read and written 4 bytes an element, past the arrays."""
    k8 = np.ones((1, 1, 4, D), np.int8)
    scale = np.ones((1, 1, 4), F32)
    for q, out in (
        (np.ones((1, 1, 2, D), np.int8), np.empty((1, 1, 2, D), np.int8)),
        (np.ones((1, 1, 2, D), F32), np.empty((1, 1, 2, D), np.int8)),
    ):
        with pytest.raises(TypeError):
            _native._core.attention(
                *(q, k8, k8, out, None, None, None, 1.0, False, 0, -1, -1, 0, 0.0, None, None),
                k_scale=scale,
                v_scale=scale,
            )


def test_paged_capacity_that_overflows_is_refused():
    """A zero-stride cache claiming 2**60 rows a block: max_blocks x block_size overflows
    int64, which once let a length skip the block table's checks."""
    cache = as_strided(np.zeros(2, F32), shape=(2, 2**60 - 1, 1, 1), strides=(4, 0, 0, 0))
    table = np.zeros((1, 8), np.int32)
    lengths = np.array([2**62], np.int64)
    q, out = np.zeros((1, 1, 1, 1), F32), np.empty((1, 1, 1, 1), F32)
    with pytest.raises(ValueError, match="at most 2"):
        _native._core.attention_paged(
            *(q, cache, cache, table, lengths, out, None, 1.0, True, 0, -1, 0, 0.0, None, None),
            *(None, None, None, None),
        )


def test_lengths_past_2_to_the_60_are_refused():
    """Called directly too: a zero-stride K of 2**62 - 1 keys with a far diagonal and window
    once overflowed int64 in the key bounds and dropped key 0 (found in review)."""
    k = as_strided(np.full(1, 3.0, np.float16), shape=(1, 1, 2**62 - 1, 1), strides=(0,) * 4)
    q, out = np.ones((1, 1, 1, 1), F32), np.empty((1, 1, 1, 1), F32)
    lengths = np.array([1], np.int64)
    with pytest.raises(ValueError, match=r"Lq and Lk must be at most 2\*\*60"):
        _native._core.attention(
            *(q, k, k, out, None, None, lengths, 1.0, False, 0, 2**62, 2**62 + 2**61 - 1),
            *(1, 0.0, None, None, None, None, 2**61),
        )


def test_misaligned_offsets_and_block_table_are_read_by_value(qkv):
    """int64 offsets and an int32 block table in a buffer at an odd byte offset (NumPy allows
    such views; the binding copies them byte-wise): the same result as aligned ones."""
    q, k, v = qkv
    raw = bytearray(8 * B + 1)
    lengths = np.frombuffer(raw, np.int64, B, 1)
    lengths[:] = [3, LK]
    assert not lengths.flags.aligned
    out, expected = out_array(), out_array()
    core(q, k, v, out, kv_lengths=lengths)
    core(q, k, v, expected, kv_lengths=np.array([3, LK], np.int64))
    np.testing.assert_array_equal(out, expected)

    cache = np.ascontiguousarray(k[0].swapaxes(0, 1))[None]  # 1 block of LK keys: (1, LK, Hkv, D)
    table = np.frombuffer(bytearray(4 * B + 1), np.int32, B, 1).reshape(B, 1)
    table[:] = 0
    assert not table.flags.aligned
    paged = []
    for t in (table, np.zeros((B, 1), np.int32)):
        o = out_array()
        _native._core.attention_paged(
            *(q, cache, cache, t, np.array([5, LK], np.int64), o, None, 0.5, False, -1, -1, 0),
            *(0.0, None, None, None, None, None, None),
        )
        paged.append(o)
    np.testing.assert_array_equal(paged[0], paged[1])


def test_record_field_with_odd_strides_on_length_one_axes(rng):
    """A field of a record array is C-contiguous with strides of whole elements on its longer
    axes only (NumPy ignores a length-1 axis's stride): accepted as it is, same result as a
    copy (found in review: a contiguous fast path let it reach the binding uncopied)."""
    import cpuattn

    rec = np.zeros(1, dtype=[("q", "<f4", (1, 3, 8)), ("tag", "u1")])
    rec["q"] = rng.standard_normal((1, 1, 3, 8))
    q = rec["q"]  # (1, 1, 3, 8): strides (97, 96, 32, 4)
    assert q.flags.c_contiguous
    assert q.strides[0] % 4 != 0
    k = rng.standard_normal((1, 1, 5, 8)).astype(F32)
    got = cpuattn.attention(q, k, k, backend="native")
    np.testing.assert_array_equal(got, cpuattn.attention(q.copy(), k, k, backend="native"))
    # a longer axis with such a stride is still refused by the binding itself
    bad = as_strided(np.zeros(64, F32), shape=(2, 1, 3, 8), strides=(97, 96, 32, 4))
    kk = k.repeat(2, 0)
    with pytest.raises(ValueError, match="not a whole element"):
        core(bad, kk, kk, np.zeros((2, 1, 3, 8), F32))
