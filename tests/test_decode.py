"""Decode shapes: few query rows against a long KV cache, the split-KV path of the native driver.

Fewer than 64 work items (batch x kv heads x query tiles) and more than 512 keys make the
driver cut the keys into chunks and merge them (csrc/tiles.h): every case here takes that path.
"""

import itertools

import numpy as np
import pytest
from reference import assert_matches, dense_attention

import cpuattn

F32 = np.float32


def decode_inputs(rng, batch, hq, hkv, lq, lk, d=64, dtype=F32):
    q = rng.standard_normal((batch, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((batch, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((batch, hkv, lk, d)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("lq", [1, 2, 4, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("options", ["plain", "kv_lengths", "causal", "kv_lengths+causal"])
def test_decode_matches_reference(attention, rng, lq, group, options):
    batch, hkv, lk = 2, 2, 3000
    q, k, v = decode_inputs(rng, batch, hkv * group, hkv, lq, lk, d=32)
    kw = {}
    if "kv_lengths" in options:
        kw["kv_lengths"] = np.array([lk, 1234])
    if "causal" in options:
        kw["causal"] = True
    out, lse = attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, **kw)
    assert_matches(out, ref_out, F32)
    assert_matches(lse, ref_lse, F32, "lse")


def test_long_cache_float64(native, rng):
    q, k, v = decode_inputs(rng, 1, 8, 1, 1, 20_000, d=16, dtype=np.float64)
    out = native(q, k, v)
    assert_matches(out, dense_attention(q, k, v)[0], np.float64)


@pytest.mark.parametrize("lq", [1, 4])
def test_decode_bitwise_identical_for_any_thread_count(native, rng, lq):
    q, k, v = decode_inputs(rng, 3, 8, 2, lq, 9000)
    kw = {"kv_lengths": np.array([9000, 4500, 17]), "causal": True, "return_lse": True}
    one = native(q, k, v, num_threads=1, **kw)
    for threads in (2, 3, 8):
        many = native(q, k, v, num_threads=threads, **kw)
        assert np.array_equal(one[0], many[0])
        assert np.array_equal(one[1], many[1])


def test_padding_past_kv_lengths_is_never_read_on_the_split_path(native, rng):
    q, k, v = decode_inputs(rng, 2, 4, 1, 1, 8192)
    lengths = np.array([3000, 8192])
    kd, vd = k.copy(), v.copy()
    kd[0, :, 3000:] = np.nan
    vd[0, :, 3000:] = np.nan
    assert np.array_equal(
        native(q, kd, vd, kv_lengths=lengths), native(q, k, v, kv_lengths=lengths)
    )


def test_merge_of_chunks_equals_the_whole(rng):
    q, k, v = decode_inputs(rng, 1, 8, 2, 4, 6000)
    whole = cpuattn.attention(q, k, v, return_lse=True)
    cuts = [0, 1000, 1001, 4096, 6000]
    parts = [
        cpuattn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True)
        for a, b in itertools.pairwise(cuts)
    ]
    out, lse = cpuattn.merge(*zip(*parts, strict=True))
    assert_matches(out, whole[0].astype(np.float64), F32)
    assert_matches(lse, whole[1].astype(np.float64), F32, "lse")


def test_nan_in_one_chunk_reaches_the_row(native, rng):
    """A chunk whose scores are all NaN keeps its NaN through the merge."""
    q, k, v = decode_inputs(rng, 1, 1, 1, 1, 4096)
    k[0, 0, :512] = np.nan
    out, lse = native(q, k, v, return_lse=True)
    assert np.isnan(out).all()
    assert np.isnan(lse).all()
