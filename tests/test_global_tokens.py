"""Hybrid attention (``global_tokens=`` beside a window): both backends and every ISA against a
dense float64 reference for every option mix, the backward, varlen and paged calls, bitwise
thread-count determinism, keys never read outside the band and the global columns, and bad
input."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_close, assert_matches, dense_attention, random_qkv

import cpuattn
from cpuattn import _native

ISAS = list(_native._core.supported_isas()) if _native.available() else []

# (batch, Hq, Hkv, Lq, Lk, D, options): global tokens at the first / last position, inside and
# outside the window, many of them, Lq != Lk both alignments, kv_lengths cutting them.
# Query tiles holding a global row mid-tile (with GQA, rows that are not whole positions) run
# the tiles only that row needs on its row blocks alone: the "global_query_mid_*" cases.
CASES = {
    # Split-KV decode cuts the band (from its first tile), not the cache: MQA (one work item)
    # over a wide window in several chunks, global keys before, inside and after the band.
    "decode_band_chunks": (
        (1,),
        4,
        1,
        1,
        9000,
        32,
        {"causal": True, "window": (3000, 0)},
        [5, 700, 6000, 8999],
    ),
    "decode_band_chunks_window_only": (
        (1,),
        4,
        1,
        1,
        9000,
        32,
        {"causal": True, "window": (3000, 0)},
        [],
    ),
    # Longformer-style: global keys far outnumber the band's tiles, cut across the chunks too.
    "decode_many_globals": (
        (1,),
        4,
        1,
        1,
        20000,
        16,
        {"causal": True, "window": (512, 0)},
        "every_128th",
    ),
    "decode_globals_after_band": (
        (1,),
        4,
        1,
        1,
        9000,
        32,
        {"window": (600, 600), "diagonal": 3000},
        [0, 8000],
    ),
    "global_query_mid_tile": ((1,), 6, 2, 300, 300, 16, {"window": (5, 5)}, [100]),
    "global_query_mid_causal": (
        (2,),
        4,
        1,
        200,
        500,
        16,
        {"causal": True, "window": (8, 0)},
        [350, 420],
    ),
    "first_tokens_causal": ((2,), 4, 2, 150, 150, 16, {"causal": True, "window": (20, 0)}, 4),
    "last_position": ((1,), 2, 1, 70, 200, 13, {"causal": True, "window": (5, 0)}, [0, 199]),
    "inside_and_outside": ((1,), 3, 3, 129, 129, 40, {"window": (10, 10)}, [3, 60, 64, 65, 128]),
    "many_globals": ((2,), 4, 1, 90, 300, 8, {"causal": True, "window": (7, 0)}, "every_7th"),
    "lq_gt_lk_bottom_right": ((1,), 2, 2, 200, 70, 16, {"causal": True, "window": (3, 0)}, 3),
    "lq_gt_lk_top_left": ((1,), 2, 2, 200, 70, 16, {"causal": "top_left", "window": (3, 0)}, 3),
    "top_left_global_query": (
        (1,),
        2,
        1,
        100,
        260,
        16,
        {"causal": "top_left", "window": (9, 0)},
        [1, 50, 99, 200],
    ),
    "kv_lengths_cut": ((3,), 2, 1, 40, 240, 16, {"causal": True, "window": (12, 0)}, [0, 70, 230]),
    "no_causal_one_sided": ((1,), 2, 1, 80, 400, 16, {"window": (-1, 4)}, [0, 1, 333]),
    "decode_split_kv": ((1,), 8, 2, 1, 5000, 64, {"causal": True, "window": (1023, 0)}, 4),
    "decode_global_query": (
        (1,),
        8,
        2,
        1,
        3000,
        32,
        {"causal": True, "window": (63, 0)},
        [2, 2999],
    ),
    "diagonal_block": (
        (1,),
        2,
        1,
        64,
        256,
        16,
        {"causal": True, "window": (30, 0), "diagonal": 500},
        [-3, 10, 520, 600],
    ),
}


def _globals(spec, lq, lk):
    if spec == "every_7th":
        return np.arange(0, max(lq, lk), 7)
    if spec == "every_128th":
        return np.arange(0, max(lq, lk), 128)
    return np.asarray(spec) if isinstance(spec, list) else spec


def _case(rng, name, dtype=np.float32):
    batch, hq, hkv, lq, lk, d, options, spec = CASES[name]
    q, k, v = random_qkv(rng, batch, hq, hkv, lq, lk, d, dtype=dtype)
    options = {**options, "global_tokens": _globals(spec, lq, lk)}
    if name == "kv_lengths_cut":
        options["kv_lengths"] = np.array([240, 69, 0])
    return q, k, v, options


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_dense_reference(attention, rng, name):
    q, k, v, options = _case(rng, name)
    out, lse = attention(q, k, v, return_lse=True, **options)
    ref_out, ref_lse = dense_attention(q, k, v, **options)
    assert_matches(out, ref_out, np.float32)
    assert_matches(lse, ref_lse, np.float32, "lse")


# Max error against float64 on the same rounded inputs, times max|v| (attention's documented
# bounds for a half output).
HALF_BOUNDS = {"float16": 2e-3, "bfloat16": 1e-2}


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "name",
    ["first_tokens_causal", "inside_and_outside", "decode_split_kv", "global_query_mid_tile"],
)
def test_every_dtype(native, rng, dtype, name):
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    q, k, v, options = _case(rng, name, dt)
    out, lse = native(q, k, v, return_lse=True, **options)
    ref_out, ref_lse = dense_attention(q, k, v, **options)
    if dtype == "float64":
        assert_matches(out, ref_out, dt)
        assert_matches(lse, ref_lse, dt, "lse")
        return
    vmax = float(np.abs(v.astype(np.float64)).max())
    assert_close(out, ref_out, HALF_BOUNDS[dtype] * vmax, "out")
    assert_close(
        lse, ref_lse, 1e-4 * max(1.0, float(np.abs(ref_lse[np.isfinite(ref_lse)]).max())), "lse"
    )


def test_composes_with_alibi_softcap_mask_and_sinks(attention, rng):
    q, k, v = random_qkv(rng, (2,), 4, 2, 100, 180, 16)
    mask = rng.random((100, 180)) > 0.2
    options = {
        "causal": True,
        "window": (9, 0),
        "global_tokens": [0, 1, 90],
        "softcap": 3.0,
        "mask": mask,
    }
    slopes = rng.uniform(0.05, 0.5, 4)
    out, lse = attention(q, k, v, alibi_slopes=slopes, return_lse=True, **options)
    ref_out, ref_lse = dense_attention(q, k, v, alibi_slopes=slopes, **options)
    assert_matches(out, ref_out, np.float32)
    assert_matches(lse, ref_lse, np.float32, "lse")
    # A sink logit only joins each row's denominator: lse grows by log(1 + e^(sink - lse)).
    sinks = rng.standard_normal(4)
    _, lse_sink = attention(q, k, v, alibi_slopes=slopes, sinks=sinks, return_lse=True, **options)
    ref = np.logaddexp(ref_lse, sinks[:, None])
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse_sink[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_without_a_window_changes_nothing(attention, rng):
    q, k, v = random_qkv(rng, (1,), 2, 1, 70, 130, 16)
    plain = attention(q, k, v, causal=True)
    hybrid = attention(q, k, v, causal=True, global_tokens=[0, 5, 100])
    np.testing.assert_array_equal(plain, hybrid)


def test_int_past_every_position_is_every_position(attention, rng):
    q, k, v = random_qkv(rng, (1,), 2, 1, 30, 40, 8)
    everything = attention(q, k, v, causal=True, window=(2, 0), global_tokens=10**12)
    full = attention(q, k, v, causal=True)
    np.testing.assert_allclose(everything, full, rtol=1e-6, atol=1e-6)


def test_keys_outside_band_and_globals_are_never_read(native, rng):
    """StreamingLLM decode: 4 sinks + a window of 1024 over a 20000-key cache. Every other K/V
    row holds NaN; the output is finite and equals attention on the kept keys alone."""
    q, k, v = random_qkv(rng, (1,), 8, 2, 1, 20000, 64)
    kept = np.r_[0:4, 20000 - 1024 : 20000]
    poisoned_k, poisoned_v = np.full_like(k, np.nan), np.full_like(v, np.nan)
    poisoned_k[..., kept, :], poisoned_v[..., kept, :] = k[..., kept, :], v[..., kept, :]
    out = native(q, poisoned_k, poisoned_v, causal=True, window=(1023, 0), global_tokens=4)
    expected = native(q, k[..., kept, :], v[..., kept, :])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "name",
    [
        "first_tokens_causal",
        "decode_split_kv",
        "many_globals",
        "global_query_mid_causal",
        "decode_band_chunks",
        "decode_globals_after_band",
        "decode_many_globals",
    ],
)
def test_bitwise_equal_for_any_thread_count(native, rng, name):
    q, k, v, options = _case(rng, name)
    first = native(q, k, v, num_threads=1, **options)
    for threads in (2, 3, 5):
        np.testing.assert_array_equal(native(q, k, v, num_threads=threads, **options), first)


@pytest.mark.parametrize("causal", [True, False])
def test_backward_matches_finite_differences(backward, rng, causal):
    q, k, v = random_qkv(rng, (2,), 4, 2, 70, 150, 8, dtype=np.float64)
    options = {
        "causal": causal,
        "window": (6, 0 if causal else 3),
        "global_tokens": [0, 1, 64, 149],
        "kv_lengths": np.array([150, 100]),
    }
    out, lse = cpuattn.attention(q, k, v, return_lse=True, backend="numpy", **options)
    dout = rng.standard_normal(out.shape)
    grads = backward(dout, q, k, v, out, lse, **options)
    eps = 1e-6
    for which, x in enumerate((q, k, v)):
        for _ in range(4):
            idx = tuple(int(rng.integers(0, n)) for n in x.shape)
            bumped = [q, k, v]
            bumped[which] = x.copy()
            bumped[which][idx] += eps
            moved = cpuattn.attention(*bumped, backend="numpy", **options)
            numeric = float(((moved - out) * dout).sum() / eps)
            assert abs(grads[which][idx] - numeric) <= 1e-5 * (1 + abs(numeric))


def test_varlen_equals_each_sequence_alone(attention, rng):
    lengths = [(50, 50), (1, 130), (90, 200)]
    cu_q = np.cumsum([0] + [a for a, _ in lengths])
    cu_k = np.cumsum([0] + [b for _, b in lengths])
    q = rng.standard_normal((cu_q[-1], 4, 16)).astype(np.float32)
    k = rng.standard_normal((cu_k[-1], 2, 16)).astype(np.float32)
    v = rng.standard_normal((cu_k[-1], 2, 16)).astype(np.float32)
    options = {"causal": True, "window": (8, 0), "global_tokens": [0, 1, 120]}
    backend = attention.keywords["backend"]
    out, lse = cpuattn.attention_varlen(
        q, k, v, cu_q, cu_k, return_lse=True, backend=backend, **options
    )
    for b in range(len(lengths)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (x.swapaxes(0, 1) for x in (q[qs], k[ks], v[ks]))
        positions = np.array([0, 1, 120])
        positions = positions[positions < max(qb.shape[1], kb.shape[1])]
        ref_out, ref_lse = dense_attention(
            qb, kb, vb, causal=True, window=(8, 0), global_tokens=positions
        )
        assert_matches(out[qs].swapaxes(0, 1), ref_out, np.float32)
        assert_matches(lse[:, qs], ref_lse, np.float32, "lse")


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_paged_equals_the_gathered_cache(attention, rng, block_size):
    lengths = np.array([300, 7, 0])
    blocks = -(-lengths // block_size)
    num_blocks = int(blocks.sum()) + 2
    ids = rng.permutation(num_blocks).astype(np.int32)
    table = np.zeros((3, int(blocks.max())), np.int32)
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = ids[at : at + n]
        at += n
    k_cache = rng.standard_normal((num_blocks, block_size, 2, 16)).astype(np.float32)
    v_cache = rng.standard_normal((num_blocks, block_size, 2, 16)).astype(np.float32)
    q = rng.standard_normal((3, 4, 2, 16)).astype(np.float32)
    options = {"window": (20, 0), "global_tokens": [0, 1, 150]}
    backend = attention.keywords["backend"]
    out = cpuattn.attention_paged(q, k_cache, v_cache, table, lengths, backend=backend, **options)
    for b, n in enumerate(lengths):
        j = np.arange(n)
        rows = table[b, j // block_size].astype(np.int64) * block_size + j % block_size
        kb, vb = (np.moveaxis(x.reshape(-1, 2, 16)[rows], 0, 1) for x in (k_cache, v_cache))
        positions = np.array([0, 1, 150])
        ref, _ = dense_attention(
            q[b],
            kb,
            vb,
            causal=True,
            global_tokens=positions[positions < max(2, n)],
            window=(20, 0),
        )
        assert_matches(out[b], ref, np.float32)


@st.composite
def problems(draw):
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 3]))
    lq, lk = draw(st.integers(1, 140)), draw(st.integers(1, 260))
    d = draw(st.integers(1, 24))
    causal = draw(st.sampled_from([False, True, "top_left"]))
    window = (draw(st.integers(-1, 30)), draw(st.integers(-1, 30)))
    if window == (-1, -1):
        window = (0, 0)
    span = max(lq, lk)
    if draw(st.booleans()):
        spec = draw(st.integers(0, 8))
    else:
        spec = np.array(sorted(draw(st.sets(st.integers(0, span - 1), max_size=10))), np.int64)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, (2,), hq, hkv, lq, lk, d)
    options = {"causal": causal, "window": window, "global_tokens": spec}
    if draw(st.booleans()):
        options["kv_lengths"] = rng.integers(0, lk + 1, size=2)
    return q, k, v, options


@pytest.mark.skipif(not ISAS, reason="no native extension")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_backends_agree_with_reference(problem):
    q, k, v, options = problem
    ref_out, ref_lse = dense_attention(q, k, v, **options)
    for backend in ("native", "numpy"):
        out, lse = cpuattn.attention(q, k, v, return_lse=True, backend=backend, **options)
        assert_matches(out, ref_out, np.float32)
        assert_matches(lse, ref_lse, np.float32, "lse")


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (-1, ValueError, "int >= 0"),
        ([3, 1], ValueError, "sorted and distinct"),
        ([1, 1], ValueError, "sorted and distinct"),
        ([-1, 2], ValueError, "[0, 2**61]"),
        ([0, 2**62], ValueError, "[0, 2**61]"),
        ([0, 2**70], ValueError, "[0, 2**61]"),
        ([[0, 1]], ValueError, "shape"),
        ([0.0, 1.0], TypeError, "int positions"),
        ([True, 2], TypeError, "int positions"),
        ([0, None], TypeError, "int positions"),
        ({0, 1}, TypeError, "int positions"),
        (2.0, TypeError, "int >= 0"),
        (True, TypeError, "int >= 0"),
        ("4", TypeError, "int >= 0"),
    ],
)
def test_bad_input_is_a_clear_error(rng, value, error, words):
    q, k, v = random_qkv(rng, (1,), 2, 1, 20, 50, 8)
    with pytest.raises(error, match="global_tokens") as info:
        cpuattn.attention(q, k, v, window=(3, 0), global_tokens=value)
    assert words in str(info.value)


def test_positions_past_the_call_name_no_token(attention, rng):
    """A position past every key and query (a sequence still shorter than the global prefix)
    is no token of the call: ignored, as the int form's positions past the call are."""
    q, k, v = random_qkv(rng, (1,), 2, 1, 3, 3, 8)
    got = attention(q, k, v, causal=True, window=(0, 0), global_tokens=[0, 1, 2, 3, 1000])
    np.testing.assert_array_equal(
        got, attention(q, k, v, causal=True, window=(0, 0), global_tokens=3)
    )


def test_diagonal_allows_positions_outside_the_call(rng):
    q, k, v = random_qkv(rng, (1,), 2, 1, 20, 50, 8)
    out = cpuattn.attention(q, k, v, window=(3, 0), diagonal=100, global_tokens=[-5, 110])
    ref, _ = dense_attention(q, k, v, window=(3, 0), diagonal=100, global_tokens=[-5, 110])
    assert_matches(out, ref, np.float32)


def test_empty_positions_are_none(attention, rng):
    q, k, v = random_qkv(rng, (1,), 2, 1, 30, 70, 8)
    window = attention(q, k, v, causal=True, window=(5, 0))
    for empty in ([], np.array([], np.int64), 0):
        hybrid = attention(q, k, v, causal=True, window=(5, 0), global_tokens=empty)
        np.testing.assert_array_equal(hybrid, window)


def test_multi_head_layer_takes_them(rng):
    layer = cpuattn.MultiHeadAttention(32, 4, seed=0)
    x = rng.standard_normal((2, 40, 32)).astype(np.float32)
    got = layer(x, causal=True, window=(3, 0), global_tokens=[0, 20])
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    kept = (j <= i) & ((j >= i - 3) | np.isin(j, [0, 20]) | np.isin(i, [0, 20]))
    np.testing.assert_allclose(got, layer(x, mask=kept), rtol=1e-5, atol=1e-6)


def test_paged_batch_takes_positions_past_a_short_sequence(rng):
    """Continuous batching: whether positions are accepted never depends on the batch's other
    sequences; a position past a sequence's length is no token of it."""
    cache = cpuattn.PagedKVCache(8, 16, 2, 16)
    long_seq, short_seq = cache.add_sequence(), cache.add_sequence()
    x = rng.standard_normal((2, 2, 2, 16)).astype(np.float32)
    cache.append([long_seq, short_seq], x, x)
    y = rng.standard_normal((1, 2, 20, 16)).astype(np.float32)
    cache.append(long_seq, y, y)
    options = {"causal": True, "window": (7, 0), "global_tokens": [0, 10]}
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    alone = cache.attend(q, [short_seq], **options)
    k, v = cache.gather(short_seq)
    expected, _ = dense_attention(q[0], k, v, causal=True, window=(7, 0), global_tokens=[0])
    assert_matches(alone[0], expected, np.float32)
    both = cache.attend(np.concatenate([q, q]), [long_seq, short_seq], **options)
    np.testing.assert_allclose(both[1], alone[0], rtol=1e-6, atol=1e-6)
