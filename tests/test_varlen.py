"""attention_varlen: packed sequences equal attention on each sequence alone."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention

import cpuattn

F32 = np.float32


def packed(rng, lengths_q, lengths_k, hq=4, hkv=2, d=16, dv=12):
    q = rng.standard_normal((sum(lengths_q), hq, d)).astype(F32)
    k = rng.standard_normal((sum(lengths_k), hkv, d)).astype(F32)
    v = rng.standard_normal((sum(lengths_k), hkv, dv)).astype(F32)
    return q, k, v, np.cumsum([0, *lengths_q]), np.cumsum([0, *lengths_k])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"causal": "top_left"},
        {"window": (7, 0), "causal": True},
        {"softcap": 3.0},
        {"alibi_slopes": "per-sequence"},
    ],
    ids=str,
)
def test_each_sequence_as_if_alone(attention, rng, kw):
    backend = attention.keywords["backend"]
    lengths_q, lengths_k = [5, 0, 33, 1, 70], [9, 4, 33, 120, 64]
    q, k, v, cu_q, cu_k = packed(rng, lengths_q, lengths_k)
    kw = dict(kw)
    if kw.get("alibi_slopes") == "per-sequence":
        kw["alibi_slopes"] = rng.random((5, 4))
    out, lse = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend=backend, **kw)
    assert out.shape == (q.shape[0], 4, 12)
    assert lse.shape == (4, q.shape[0])
    for b in range(5):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        one = {**kw, "alibi_slopes": kw["alibi_slopes"][b]} if "alibi_slopes" in kw else kw
        ref_out, ref_lse = dense_attention(
            q[qs].swapaxes(0, 1), k[ks].swapaxes(0, 1), v[ks].swapaxes(0, 1), **one
        )
        assert_matches(out[qs].swapaxes(0, 1), ref_out, F32)
        assert_matches(lse[:, qs], ref_lse, F32, "lse")


@pytest.mark.parametrize(
    ("cu_q", "cu_k", "exc", "match"),
    [
        ([0, 3, 5], [0, 9], ValueError, r"cu_seqlens_k: expected 3 entries"),
        (
            [1, 5],
            [0, 9],
            ValueError,
            r"cu_seqlens_q: expected offsets starting at 0 and ending at 5",
        ),
        (
            [0, 5],
            [0, 8],
            ValueError,
            r"cu_seqlens_k: expected offsets starting at 0 and ending at 9",
        ),
        ([0, 4, 2, 5], [0, 3, 6, 9], ValueError, "cu_seqlens_q: offsets must be non-decreasing"),
        ([0.0, 5.0], [0, 9], TypeError, "cu_seqlens_q: expected integer offsets"),
        ([[0, 5]], [0, 9], ValueError, r"cu_seqlens_q: expected a 1-D array of B \+ 1 offsets"),
    ],
)
def test_bad_offsets(rng, cu_q, cu_k, exc, match):
    q, k, v, _, _ = packed(rng, [5], [9])
    with pytest.raises(exc, match=match):
        cpuattn.attention_varlen(q, k, v, np.array(cu_q), np.array(cu_k))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.int32])
@pytest.mark.parametrize("backend", ["auto", "numpy"])
def test_offsets_of_any_integer_dtype_are_checked(rng, dtype, backend):
    """Unsigned offsets once passed the order check (np.diff wraps, never below 0): the numpy
    backend then computed overlapping sequences, the later overwriting the earlier (found in
    review). Forward, backward and packed paged queries."""
    q, k, v, _, _ = packed(rng, [6], [6], hq=2, hkv=2, d=8, dv=8)
    bad = np.array([0, 5, 3, 6], dtype)
    match = "cu_seqlens_q: offsets must be non-decreasing"
    with pytest.raises(ValueError, match=match):
        cpuattn.attention_varlen(q, k, v, bad, bad, backend=backend)
    lse = np.zeros((2, 6), F32)
    with pytest.raises(ValueError, match=match):
        cpuattn.attention_varlen_backward(q, q, k, v, q, lse, bad, bad, backend=backend)
    cache = np.zeros((3, 4, 2, 8), F32)
    with pytest.raises(ValueError, match=match):
        cpuattn.attention_paged(
            *(q, cache, cache, np.array([[0], [1], [2]]), np.array([4, 4, 4])),
            cu_seqlens_q=bad,
            backend=backend,
        )


def test_bad_shapes(rng):
    q, k, v, cu_q, cu_k = packed(rng, [5], [9])
    with pytest.raises(ValueError, match=r"q: expected \(total, H, D\) for varlen"):
        cpuattn.attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected shape \(Hq,\)"):
        cpuattn.attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="must divide"):
        cpuattn.attention_varlen(q[:, :3], k, v, cu_q, cu_k)


UNEVEN_Q = [1, 0, 300, 7, 64, 65, 0, 129, 2, 40]
UNEVEN_K = [1, 5, 300, 0, 64, 200, 0, 129, 333, 40]


@pytest.mark.parametrize(
    "kw",
    [{}, {"causal": True}, {"causal": "top_left"}, {"window": (20, 3), "causal": True}],
    ids=str,
)
def test_native_one_call_matches_each_sequence(native, rng, kw):
    """The native backend's single work list over (sequence, kv head, query tile), on every
    ISA: uneven lengths, empty queries, sequences with no keys, GQA, D not a vector multiple."""
    q, k, v, cu_q, cu_k = packed(rng, UNEVEN_Q, UNEVEN_K, hq=8, hkv=2, d=40, dv=24)
    out, lse = cpuattn.attention_varlen(
        q, k, v, cu_q, cu_k, return_lse=True, backend="native", **kw
    )
    for b in range(len(UNEVEN_Q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref_out, ref_lse = dense_attention(
            q[qs].swapaxes(0, 1), k[ks].swapaxes(0, 1), v[ks].swapaxes(0, 1), **kw
        )
        assert_matches(out[qs].swapaxes(0, 1), ref_out, F32)
        assert_matches(lse[:, qs], ref_lse, F32, "lse")


def test_native_bitwise_identical_for_any_thread_count(rng):
    q, k, v, cu_q, cu_k = packed(rng, UNEVEN_Q, UNEVEN_K, hq=8, hkv=2, d=40, dv=24)
    kw = {"causal": True, "return_lse": True, "backend": "native"}
    one = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, num_threads=1, **kw)
    for threads in (2, 3, 7):
        many = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, num_threads=threads, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(one, many, strict=True))


def test_native_matches_numpy_backend_in_bfloat16(rng):
    from cpuattn._request import BF16

    q, k, v, cu_q, cu_k = packed(rng, UNEVEN_Q, UNEVEN_K, hq=4, hkv=4, d=64, dv=64)
    q, k, v = q.astype(BF16), k.astype(BF16), v.astype(BF16)
    ours = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="native")
    theirs = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, backend="numpy")
    assert ours.dtype == BF16
    scale = float(np.abs(v.astype(np.float64)).max())
    assert np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max() <= 1e-2 * scale


@pytest.mark.parametrize(
    ("cu_q", "cu_k", "exc"),
    [
        ([0, 4, 2, 5], [0, 3, 6, 9], ValueError),  # decreasing
        ([0, 3, 6], [0, 3, 6, 9], ValueError),  # lengths differ
        ([0, 3, 4], [0, 3, 9], ValueError),  # does not end at total_q
        ([0, 3, 5], [1, 3, 9], ValueError),  # does not start at 0
    ],
)
def test_core_rejects_bad_offsets(rng, cu_q, cu_k, exc):
    """The binding re-checks what memory safety depends on, whatever the Python layer did."""
    core = pytest.importorskip("cpuattn._core")
    q, k, v, _, _ = packed(rng, [5], [9])
    q, k, v = (np.ascontiguousarray(x.swapaxes(0, 1)) for x in (q, k, v))
    out = np.empty((4, 5, 12), F32)

    def call(cu_q, cu_k):
        core.attention(
            q, k, v, out, None, None, None, 1.0, False, 0, -1, -1, 0, 0.0, None, None, cu_q, cu_k
        )

    with pytest.raises(exc):
        call(np.array(cu_q, np.int64), np.array(cu_k, np.int64))
    with pytest.raises(TypeError):
        call(np.array([0, 5], np.int32), np.array([0, 9], np.int64))
