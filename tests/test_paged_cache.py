"""PagedKVCache against a list-of-arrays model; KVCache with int8; all-or-nothing appends."""

import doctest
import inspect
import pickle
import warnings

import ml_dtypes
import numpy as np
import pytest

import cpuattn
from cpuattn import _paged_cache
from cpuattn._paged_cache import PagedKVCache
from cpuattn._quantize import dequantize_int8, quantize_int8

F32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float64, np.float16, BF16, np.int8]
dtype_ids = [np.dtype(d).name for d in DTYPES]


def stored(x, dtype):
    """What the cache holds of float32 ``x``, read back as gather returns it."""
    dtype = np.dtype(dtype)
    if dtype == np.int8:
        return dequantize_int8(*quantize_int8(x))
    return x.astype(dtype).astype(np.float64 if dtype == np.float64 else F32)


def state(cache, seqs):
    """Everything an append could change."""
    arrays = [cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale]
    return (
        [None if a is None else a.copy() for a in arrays],
        cache.num_free_blocks,
        cache.block_table(seqs).tolist(),
        cache.lengths(seqs).tolist(),
    )


def assert_same_state(before, after):
    for a, b in zip(before[0], after[0], strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert before[1:] == after[1:]


def check_against_model(cache, model, dtype):
    live = list(model)
    held = [
        b
        for row, s in zip(cache.block_table(live), live, strict=True)
        for b in row[: n_blocks(cache, s)]
    ]
    assert len(set(held)) == len(held)  # no block shared by two sequences
    assert cache.num_free_blocks + len(held) == cache.num_blocks
    for s, (ks, vs) in model.items():
        k, v = cache.gather(s)
        want_k = np.concatenate(ks, axis=1) if ks else np.zeros((2, 0, 8), F32)
        want_v = np.concatenate(vs, axis=1) if vs else np.zeros((2, 0, 5), F32)
        assert k.flags.c_contiguous
        assert v.flags.c_contiguous
        assert k.dtype == (np.float64 if dtype == np.float64 else F32)
        assert np.array_equal(k, stored(want_k, dtype))
        assert np.array_equal(v, stored(want_v, dtype))
        assert cache.lengths(s).tolist() == [want_k.shape[1]]


def n_blocks(cache, seq):
    return -(-int(cache.lengths(seq)[0]) // cache.block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_interleaved_appends_match_a_list_model(rng, dtype):
    cache = PagedKVCache(40, 5, 2, 8, value_dim=5, dtype=dtype)
    model = {}
    for step in range(30):
        if step % 4 == 0:
            model[cache.add_sequence()] = ([], [])
        if step % 7 == 6:  # free one, its blocks go back
            cache.free(gone := sorted(model)[int(rng.integers(len(model)))])
            del model[gone]
        if not model:
            continue
        seqs = rng.permutation(sorted(model))[: int(rng.integers(1, len(model) + 1))]
        t = int(rng.integers(0, 9))
        if cache.num_free_blocks < len(seqs) * 2 + 2:
            continue
        k = rng.standard_normal((len(seqs), 2, t, 8)).astype(F32)
        v = rng.standard_normal((len(seqs), 2, t, 5)).astype(F32)
        cache.append(seqs if step % 2 else list(seqs), k, v)
        for i, s in enumerate(seqs):
            model[s][0].append(k[i])
            model[s][1].append(v[i])
        check_against_model(cache, model, dtype)


def test_block_table_and_lengths_contents(rng):
    cache = PagedKVCache(10, 4, 1, 2)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    assert (a, b, c) == (0, 1, 2)
    assert cache.block_table([a, b, c]).tolist() == [[0], [0], [0]]  # at least 1 column
    assert cache.block_table([]).shape == (0, 1)
    assert cache.lengths([]).tolist() == []
    cache.append([b, a], np.ones((2, 1, 5, 2)), np.ones((2, 1, 5, 2)))  # b first: 0, 1
    cache.append(c, np.ones((1, 1, 1, 2)), np.ones((1, 1, 1, 2)))
    cache.append(np.array([a]), np.ones((1, 1, 4, 2)), np.ones((1, 1, 4, 2)))
    table = cache.block_table(np.array([a, b, c], np.int32))
    assert table.dtype == np.int32
    assert table.tolist() == [[2, 3, 5], [0, 1, 0], [4, 0, 0]]
    assert cache.block_table(b).tolist() == [[0, 1]]
    lengths = cache.lengths([a, b, c])
    assert lengths.dtype == np.int64
    assert lengths.tolist() == [9, 5, 1]
    assert cache.lengths([c, c]).tolist() == [1, 1]  # repeats are fine when reading
    assert cache.num_free_blocks == 4
    # Position p of a sequence is k_cache[table[p // block_size], p % block_size].
    k = rng.standard_normal((1, 1, 3, 2)).astype(F32)
    cache.append(c, k, k)
    p = np.arange(1, 4)
    assert np.array_equal(cache.k_cache[cache.block_table(c)[0][p // 4], p % 4, 0], k[0, 0])


def test_freed_blocks_are_reused_lowest_first_and_ids_are_not():
    cache = PagedKVCache(6, 2, 1, 1, dtype=np.int8)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append([a, b], np.ones((2, 1, 5, 1)), np.ones((2, 1, 5, 1)))  # a: 0 1 2, b: 3 4 5
    assert cache.num_free_blocks == 0
    cache.free(a)
    assert cache.num_free_blocks == 3
    c = cache.add_sequence()
    assert c not in (a, b)
    assert cache.lengths(c).tolist() == [0]
    cache.append(c, np.full((1, 1, 3, 1), 2.0), np.full((1, 1, 3, 1), 3.0))
    assert cache.block_table(c).tolist() == [[0, 1]]
    k, v = cache.gather(c)
    assert k.ravel().tolist() == [2.0] * 3
    assert v.ravel().tolist() == [3.0] * 3
    with pytest.raises(ValueError, match=r"PagedKVCache.free: seq: unknown sequence id 0"):
        cache.free(a)
    with pytest.raises(ValueError, match=r"PagedKVCache.gather: seq: unknown sequence id 0"):
        cache.gather(a)
    with pytest.raises(ValueError, match=r"PagedKVCache.lengths: seqs: unknown sequence id 0"):
        cache.lengths([b, a])
    with pytest.raises(ValueError, match=r"block_table: seqs: unknown sequence id 99"):
        cache.block_table(99)
    with pytest.raises(TypeError, match=r"PagedKVCache.free: seq: expected a sequence id"):
        cache.free([b])
    with pytest.raises(ValueError, match=r"PagedKVCache.lengths: seqs: .* got shape \(1, 1\)"):
        cache.lengths([[b]])
    with pytest.raises(TypeError, match=r"PagedKVCache.lengths: seqs: .* of dtype float64"):
        cache.lengths([1.0])
    cache.free(b)
    cache.free(np.int64(c))
    assert cache.num_free_blocks == 6


def test_int8_gather_is_within_half_a_scale(rng):
    cache = PagedKVCache(16, 3, 2, 32, dtype=np.int8)
    s = cache.add_sequence()
    k = (rng.standard_normal((1, 2, 20, 32)) * rng.uniform(0.1, 10, (1, 2, 20, 1))).astype(F32)
    cache.append(s, k, -k)
    got_k, got_v = cache.gather(s)
    _, scales = quantize_int8(k[0])
    assert np.all(np.abs(got_k - k[0]) <= scales[..., None] * (0.5 + 1e-5))
    assert np.all(np.abs(got_v + k[0]) <= scales[..., None] * (0.5 + 1e-5))
    assert cache.k_cache.dtype == np.int8
    assert cache.k_scale.shape == cache.v_scale.shape == (16, 3, 2)
    assert cache.k_scale.dtype == F32


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64], ids=str)
def test_attributes(dtype):
    cache = PagedKVCache(np.int64(7), 4, 3, 16, value_dim=np.array(8), dtype=dtype)
    assert cache.k_cache.shape == (7, 4, 3, 16)
    assert cache.v_cache.shape == (7, 4, 3, 8)
    assert cache.k_cache.dtype == cache.v_cache.dtype == np.dtype(dtype)
    assert cache.k_scale is None
    assert cache.v_scale is None
    assert (cache.num_blocks, cache.block_size, cache.num_free_blocks) == (7, 4, 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_blocks_hold_their_heads_one_after_the_other(rng, dtype):
    """The arrays are (block, position, head) views of memory laid out (block, head,
    position): a head's positions of a block are one run, which decode reads fastest. Writes
    through them land there, and a pickled cache keeps the layout and its contents."""
    cache = PagedKVCache(5, 4, 3, 16, value_dim=8, dtype=dtype)
    arrays = [cache.k_cache, cache.v_cache, cache.k_scale, cache.v_scale]
    for a in arrays[: 4 if np.dtype(dtype) == np.int8 else 2]:
        assert a.shape[:3] == (5, 4, 3)
        assert a.swapaxes(1, 2).flags.c_contiguous
    s = cache.add_sequence()
    k = rng.standard_normal((1, 3, 10, 16)).astype(F32)
    cache.append(s, k, rng.standard_normal((1, 3, 10, 8)))
    block = cache.block_table(s)[0][2]  # position 9 = 2 * 4 + 1, in the memory itself
    row = cache.k_cache.swapaxes(1, 2)[block, :, 1]  # (heads, head_dim)
    if cache.k_scale is not None:
        row = dequantize_int8(row, cache.k_scale.swapaxes(1, 2)[block, :, 1])
    assert np.array_equal(row.astype(np.float64), stored(k[0, :, 9], dtype).astype(np.float64))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.k_cache.swapaxes(1, 2).flags.c_contiguous
    for a, b in zip(cache.gather(s), copy.gather(s), strict=True):
        assert np.array_equal(a, b)
    q = rng.standard_normal((1, 6, 1, 16)).astype(np.float64 if dtype == np.float64 else F32)
    assert np.array_equal(cache.attend(q, [s]), copy.attend(q, [s]))


@pytest.mark.parametrize("dtype", [np.float32, np.int8], ids=str)
def test_a_cache_pickled_before_the_heads_first_memory_loads(rng, dtype):
    """Pickles of caches that held the (block, position, head) arrays themselves load with
    the same contents, in the heads-first memory."""
    cache = PagedKVCache(4, 4, 2, 8, dtype=dtype)
    s = cache.add_sequence()
    cache.append(s, rng.standard_normal((1, 2, 7, 8)), rng.standard_normal((1, 2, 7, 8)))
    old = {n: x for n, x in vars(cache).items() if not n.endswith("_store")}
    for name in ("k_cache", "v_cache", "k_scale", "v_scale"):  # as the old version kept them
        x = getattr(cache, name)
        old[name] = None if x is None else np.ascontiguousarray(x)
    loaded = PagedKVCache.__new__(PagedKVCache)
    loaded.__setstate__(pickle.loads(pickle.dumps(old)))
    assert loaded.k_cache.swapaxes(1, 2).flags.c_contiguous
    for a, b in zip(cache.gather(s), loaded.gather(s), strict=True):
        assert np.array_equal(a, b)
    assert (loaded.k_scale is None) == (np.dtype(dtype) != np.int8)


@pytest.mark.parametrize(
    ("args", "kw", "exc", "match"),
    [
        ((4, 0, 1, 8), {}, ValueError, r"PagedKVCache: block_size must be >= 1, got 0"),
        ((-1, 4, 1, 8), {}, ValueError, r"PagedKVCache: num_blocks must be >= 0, got -1"),
        ((4, 4, 1, 8.0), {}, TypeError, r"PagedKVCache: head_dim: expected an int >= 0"),
        ((4, True, 1, 8), {}, TypeError, r"PagedKVCache: block_size: expected an int"),
        ((4, 4, 1, 8), {"value_dim": -2}, ValueError, r"value_dim must be >= 0, got -2"),
        ((4, 4, 1, 8), {"dtype": np.int32}, TypeError, r"dtype must be float32, .*got int32"),
    ],
    ids=["block_size-0", "negative", "float", "bool", "value_dim", "dtype"],
)
def test_constructor_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        PagedKVCache(*args, **kw)


def ones(*shape, dtype=F32):
    return np.ones(shape, dtype)


@pytest.mark.parametrize(
    ("seqs", "k", "v", "exc", "match"),
    [
        ([0, 7], ones(2, 2, 1, 4), ones(2, 2, 1, 3), ValueError, r"unknown sequence id 7"),
        ([0, 0], ones(2, 2, 1, 4), ones(2, 2, 1, 3), ValueError, r"expected distinct ids"),
        (0.0, ones(1, 2, 1, 4), ones(1, 2, 1, 3), TypeError, r"seqs: expected a sequence id"),
        ([0.0], ones(1, 2, 1, 4), ones(1, 2, 1, 3), TypeError, r"seqs: expected a sequence id"),
        ([[0]], ones(1, 2, 1, 4), ones(1, 2, 1, 3), ValueError, r"seqs: .*shape \(1, 1\)"),
        (0, ones(1, 2, 1, 4, dtype=np.complex64), ones(1, 2, 1, 3), TypeError, r"k: expected real"),
        (0, ones(1, 2, 1, 4), np.full((1, 2, 1, 3), "a"), TypeError, r"v: expected real"),
        (0, ones(2, 1, 4), ones(2, 1, 3), ValueError, r"k must have shape \(1, 2, T, 4\)"),
        ([0, 1], ones(1, 2, 1, 4), ones(1, 2, 1, 3), ValueError, r"k must have shape \(2, 2,"),
        (0, ones(1, 2, 1, 4), ones(1, 2, 2, 3), ValueError, r"v must have shape \(1, 2, 1, 3\)"),
        ([1, 0], ones(2, 2, 6, 4), ones(2, 2, 6, 3), MemoryError, r"need 4 more blocks, 2 of 6"),
    ],
    ids=["unknown", "repeated", "float-id", "float-ids", "2-d", "complex", "str", "3-d",
         "n", "v-shape", "out-of-blocks"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_failing_append_changes_nothing(rng, dtype, seqs, k, v, exc, match):
    cache = PagedKVCache(6, 3, 2, 4, value_dim=3, dtype=dtype)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append([a, b], rng.standard_normal((2, 2, 4, 4)), rng.standard_normal((2, 2, 4, 3)))
    cache.append(a, rng.standard_normal((1, 2, 1, 4)), rng.standard_normal((1, 2, 1, 3)))
    before = state(cache, [a, b])
    with pytest.raises(exc, match=match):
        cache.append(seqs, k, v)
    assert_same_state(before, state(cache, [a, b]))
    # The blocks left still serve an append that fits: 2 + 3 new positions, 1 + 1 blocks.
    cache.append([a, b], ones(2, 2, 1, 4), ones(2, 2, 1, 3))
    assert cache.lengths([a, b]).tolist() == [6, 5]


def test_failing_int8_append_changes_nothing(rng):
    cache = PagedKVCache(6, 3, 2, 4, dtype=np.int8)
    a = cache.add_sequence()
    cache.append(a, rng.standard_normal((1, 2, 2, 4)), rng.standard_normal((1, 2, 2, 4)))
    before = state(cache, [a])
    v = np.ones((1, 2, 2, 4))
    v[0, 1, 1, 3] = np.nan
    with pytest.raises(ValueError, match=r"PagedKVCache.append: v: expected finite values"):
        cache.append(a, np.ones((1, 2, 2, 4)), v)
    assert_same_state(before, state(cache, [a]))


def test_failing_cast_changes_nothing():
    cache = PagedKVCache(6, 3, 1, 2, dtype=np.float16)
    a, b = cache.add_sequence(), cache.add_sequence()
    before = state(cache, [a, b])
    k = np.ones((2, 1, 4, 2))
    k[1, 0, 3] = 1e300  # the second sequence's cast overflows: warns, an error here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="overflow"):
            cache.append([a, b], k, np.ones((2, 1, 4, 2)))
    assert_same_state(before, state(cache, [a, b]))


def test_integers_and_empty_appends():
    cache = PagedKVCache(4, 2, 1, 3, dtype=np.int8)
    a = cache.add_sequence()
    cache.append(a, np.arange(6).reshape(1, 1, 2, 3), np.full((1, 1, 2, 3), -4, np.int64))
    k, v = cache.gather(a)
    assert np.array_equal(k[0], stored(np.arange(6, dtype=F32).reshape(2, 3), np.int8))
    assert np.array_equal(v, np.full((1, 2, 3), -4.0, F32))
    cache.append(a, np.ones((1, 1, 0, 3)), np.ones((1, 1, 0, 3)))
    cache.append([], np.ones((0, 1, 5, 3)), np.ones((0, 1, 5, 3)))
    assert cache.lengths(a).tolist() == [2]
    assert cache.num_free_blocks == 3


def test_docstring_examples():
    failures, tried = doctest.testmod(_paged_cache, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 5
    assert failures == 0


# KVCache with dtype=np.int8


def test_kv_cache_int8_matches_quantize_int8(rng):
    cache = cpuattn.KVCache(2, 3, 10, 8, value_dim=4, dtype=np.int8)
    assert cache.k.dtype == cache.v.dtype == np.int8
    assert cache.k_scale.shape == cache.v_scale.shape == (2, 3, 10)
    assert cache.k_scale.dtype == cache.v_scale.dtype == F32
    chunks = [
        (rng.standard_normal((2, 3, t, 8)) * 5, rng.standard_normal((2, 3, t, 4)).astype(F32))
        for t in (4, 1, 3)
    ]
    for k, v in chunks:
        cache.append(k, v)
    k, v = (np.concatenate(x, axis=2) for x in zip(*chunks, strict=True))
    for got, got_scale, x in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        q, scales = quantize_int8(x)
        assert np.array_equal(got[:, :, :8], q)
        assert np.array_equal(got_scale[:, :, :8], scales)
        assert not got[:, :, 8:].any()
        assert not got_scale[:, :, 8:].any()
        err = np.abs(dequantize_int8(got, got_scale)[:, :, :8] - x.astype(F32))
        assert np.all(err <= got_scale[:, :, :8, None] * (0.5 + 1e-5))
    assert cache.lengths.tolist() == [8, 8]
    cache.reset()
    cache.append(np.ones((2, 3, 10, 8)), np.full((2, 3, 10, 4), 2, np.int32))  # ints are fine
    assert cache.lengths.tolist() == [10, 10]
    assert np.all(cache.v == 127)
    assert np.all(cache.v_scale == F32(2) / F32(127))


def test_kv_cache_int8_failing_append_changes_nothing(rng):
    cache = cpuattn.KVCache(1, 2, 4, 3, dtype=np.int8)
    cache.append(rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 2, 3)))
    before = [x.copy() for x in (cache.k, cache.v, cache.k_scale, cache.v_scale, cache.lengths)]
    v = np.ones((1, 2, 1, 3))
    v[0, 0, 0, 0] = np.inf
    cases = [
        (np.ones((1, 2, 1, 3)), v, ValueError, r"KVCache.append: v: expected finite"),
        (np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3)), ValueError, r"would pass max_len = 4"),
        (np.ones((1, 2, 1, 3), np.complex64), v, TypeError, r"KVCache.append: k: expected real"),
    ]
    for k, v, exc, match in cases:
        with pytest.raises(exc, match=match):
            cache.append(k, v)
        after = (cache.k, cache.v, cache.k_scale, cache.v_scale, cache.lengths)
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=str)
def test_kv_cache_float_has_no_scales(dtype):
    cache = cpuattn.KVCache(1, 2, 4, 3, dtype=dtype)
    assert cache.k_scale is None
    assert cache.v_scale is None


# Attention over the caches: runs once attention_paged and k_scale= exist.


def padded(arrays, length):
    """(n, H, length, D): each (H, L_i, D) zero-padded to ``length``."""
    return np.stack([np.pad(a, ((0, 0), (0, length - a.shape[1]), (0, 0))) for a in arrays])


@pytest.mark.skipif(not hasattr(cpuattn, "attention_paged"), reason="no attention_paged yet")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_attend_equals_attention_on_the_gathered_keys(rng, dtype):
    cache = PagedKVCache(64, 5, 2, 16, value_dim=12, dtype=dtype)
    seqs = [cache.add_sequence() for _ in range(4)]
    other = cache.add_sequence()  # interleaved, so blocks are not in order
    for t in (3, 7, 1):
        for s in (*seqs[: 1 + t % 4], other):
            n = int(rng.integers(1, 9))
            cache.append(s, rng.standard_normal((1, 2, n, 16)), rng.standard_normal((1, 2, n, 12)))
    lengths = cache.lengths(seqs)
    lq = 2
    k, v = zip(*(cache.gather(s) for s in seqs), strict=True)  # float32, float64 for float64
    q = rng.standard_normal((4, 4, lq, 16)).astype(k[0].dtype)  # GQA: 4 query on 2 kv heads
    k, v = padded(k, lengths.max()), padded(v, lengths.max())
    want = cpuattn.attention(q, k, v, kv_lengths=lengths, causal=True)
    got = cache.attend(q, seqs, causal=True)
    assert got.shape == (4, 4, lq, 12)
    top = float(np.abs(v).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * top)


@pytest.mark.skipif(
    "k_scale" not in inspect.signature(cpuattn.attention).parameters,
    reason="no attention(k_scale=) yet",
)
def test_int8_kv_cache_attention_equals_the_dequantized_keys(rng):
    cache = cpuattn.KVCache(2, 2, 16, 8, dtype=np.int8)
    cache.append(rng.standard_normal((2, 2, 9, 8)), rng.standard_normal((2, 2, 9, 8)))
    q = rng.standard_normal((2, 4, 3, 8)).astype(F32)
    got = cpuattn.attention(
        q, cache.k, cache.v, k_scale=cache.k_scale, v_scale=cache.v_scale,
        kv_lengths=cache.lengths, causal=True,
    )  # fmt: skip
    k, v = dequantize_int8(cache.k, cache.k_scale), dequantize_int8(cache.v, cache.v_scale)
    want = cpuattn.attention(q, k, v, kv_lengths=cache.lengths, causal=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.abs(v).max()))
