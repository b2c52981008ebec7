"""Many (batch, kv head) pairs per thread: each task runs one whole head, handed out in runs
(TaskRuns) and prefetching the next head's q, K, V and out; score_rows reads q rows in place
when a tile's rows are a constant stride apart. Every layout here against the float64
reference and the NumPy backend, per ISA, and bitwise the same for any thread count."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention

import cpuattn

B, LQ, LK, D = 8, 70, 90, 24  # >= 8 (batch, kv head) pairs: whole-head tasks on 1 thread


def _make(rng, layout, hq, hkv, dtype, b=B):
    """q (b, hq, LQ, D), k and v (b, hkv, LK, D) in the named memory layout."""

    def fresh(h, l):
        return rng.standard_normal((b, h, l, D)).astype(dtype)

    if layout == "contiguous":
        return fresh(hq, LQ), fresh(hkv, LK), fresh(hkv, LK)
    if layout == "blhd":  # projection outputs (B, L, H, D) viewed as (B, H, L, D)
        return tuple(
            rng.standard_normal((b, l, h, D)).astype(dtype).swapaxes(1, 2)
            for h, l in ((hq, LQ), (hkv, LK), (hkv, LK))
        )
    if layout == "reversed":  # negative strides on batch and positions
        return tuple(fresh(h, l)[::-1, :, ::-1] for h, l in ((hq, LQ), (hkv, LK), (hkv, LK)))
    if layout == "broadcast_q":  # one q for every batch entry: batch stride 0
        q = np.broadcast_to(rng.standard_normal((1, hq, LQ, D)).astype(dtype), (b, hq, LQ, D))
        return q, fresh(hkv, LK), fresh(hkv, LK)
    raise AssertionError(layout)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (8, 1), (8, 2)], ids=["mha", "mqa", "gqa4"])
@pytest.mark.parametrize("layout", ["contiguous", "blhd", "reversed", "broadcast_q"])
def test_layouts_match_reference(native, rng, dtype, hq, hkv, layout):
    q, k, v = _make(rng, layout, hq, hkv, dtype)
    kw = {"causal": True, "kv_lengths": [90, 0, 45, 90, 1, 70, 64, 65], "return_lse": True}
    out, lse = native(q, k, v, num_threads=1, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, causal=True, kv_lengths=kw["kv_lengths"])
    assert_matches(out, ref_out, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")
    np_out, np_lse = cpuattn.attention(q, k, v, backend="numpy", **kw)
    assert_matches(out, np_out, dtype)
    assert_matches(lse, np_lse, dtype, "lse")


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_half_cache_with_float32_queries(native, rng, kv_dtype):
    import ml_dtypes

    half = np.float16 if kv_dtype == "float16" else ml_dtypes.bfloat16
    q, k, v = _make(rng, "blhd", 8, 8, np.float32)
    k, v = k.astype(half), v.astype(half)
    out = native(q, k, v, num_threads=1)
    assert_matches(out, dense_attention(q, k, v)[0], np.float32)


@pytest.mark.parametrize("layout", ["contiguous", "blhd", "reversed"])
def test_bitwise_identical_for_any_thread_count(rng, layout):
    """Runs of whole heads split differently between 1, 2 and 3 threads; 33 pairs, so the
    last runs are uneven."""
    q, k, v = _make(rng, layout, 6, 3, np.float32, b=11)
    kw = {"causal": "top_left", "return_lse": True, "scale": 0.3}
    expected = cpuattn.attention(q, k, v, num_threads=1, **kw)
    for threads in (2, 3):
        got = cpuattn.attention(q, k, v, num_threads=threads, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_softcap_and_alibi_with_queries_in_place(native, rng):
    q, k, v = _make(rng, "contiguous", 8, 8, np.float32)
    slopes = 2.0 ** -np.arange(1, 9)
    out = native(q, k, v, softcap=5.0, alibi_slopes=slopes, causal=True, num_threads=1)
    ref = dense_attention(q, k, v, softcap=5.0, alibi_slopes=slopes, causal=True)[0]
    assert_matches(out, ref, np.float32)


@pytest.mark.parametrize("lq", [10, 20], ids=["rows-in-place", "packed"])
def test_heads_of_one_query_tile(native, rng, lq):
    """Heads of one query tile (sentences of up to 64 tokens) run as whole-head tasks too,
    each prefetching the next: 11 x 3 pairs, 20 or 40 query rows a kv head. Up to 4 threads
    take whole heads (8 pairs a thread), 5 one tile at a time: the same bits."""
    q = rng.standard_normal((11, 6, lq, D)).astype(np.float32)
    k, v = (rng.standard_normal((11, 3, 37, D)).astype(np.float32) for _ in range(2))
    kw = {"kv_lengths": rng.integers(0, 38, 11), "return_lse": True}
    expected = native(q, k, v, num_threads=1, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, kv_lengths=kw["kv_lengths"])
    assert_matches(expected[0], ref_out, np.float32)
    assert_matches(expected[1], ref_lse, np.float32, "lse")
    for threads in (2, 3, 5):
        got = native(q, k, v, num_threads=threads, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
