"""``diagonal=``: query ``i`` sits at key ``i + diagonal`` for causal, window and ALiBi, on
every backend, against the float64 reference; blocks of one long sequence placed on its global
diagonal reproduce the whole call."""

import itertools

import numpy as np
import pytest
from reference import assert_matches, check, dense_attention, random_qkv

import cpuattn
from cpuattn._request import BF16

F32 = np.float32

# Diagonals before, across and past the keys (Lk = 70 below), tile-sized and not.
DIAGONALS = [-200, -64, -5, 0, 1, 37, 64, 69, 70, 500]


@pytest.mark.parametrize("diagonal", DIAGONALS)
@pytest.mark.parametrize(
    "options",
    [
        {"causal": True},
        {"causal": "top_left"},
        {"window": (9, 3)},
        {"causal": True, "window": (20, 0)},
        {"alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
        {"causal": True, "alibi_slopes": np.array([0.5, 0.25, 0.125, 0.0625])},
        {},
    ],
    ids=["causal", "top_left", "window", "causal_window", "alibi", "causal_alibi", "plain"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
def test_diagonal_matches_reference(attention, rng, diagonal, options, dtype):
    q, k, v = random_qkv(rng, (2,), 4, 2, 90, 70, 16, dtype=dtype)
    check(attention, q, k, v, dtype=dtype, diagonal=diagonal, **options)


def test_default_diagonals_are_the_alignments(attention, rng):
    """diagonal = Lk - Lq is bottom-right, diagonal = 0 is top-left: the same bits."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 40, 130, 8)
    for causal, diagonal in (("bottom_right", 90), ("top_left", 0)):
        for options in ({"window": (5, 2)}, {"alibi_slopes": np.array([0.3, 0.1])}, {}):
            expected = attention(q, k, v, causal=causal, return_lse=True, **options)
            got = attention(q, k, v, causal=True, diagonal=diagonal, return_lse=True, **options)
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_array_equal(a, b)


def test_kv_lengths_bound_the_keys_not_the_diagonal(attention, rng):
    q, k, v = random_qkv(rng, (3,), 2, 1, 30, 100, 8)
    lengths = np.array([100, 41, 0])
    out, lse = check(attention, q, k, v, kv_lengths=lengths, causal=True, diagonal=60)
    assert np.all(lse[2] == -np.inf)
    assert np.all(out[2] == 0)


@pytest.mark.parametrize(("lq", "lk"), [(300, 300), (130, 250), (250, 130)])
@pytest.mark.parametrize(
    "options",
    [
        {"causal": True},
        {"causal": "top_left"},
        {"causal": True, "window": (40, 0)},
        {"window": (30, 70)},
        {"causal": True, "alibi_slopes": np.array([0.2, 0.05])},
    ],
    ids=["causal", "top_left", "sliding", "window", "alibi"],
)
def test_blocks_on_the_global_diagonal_merge_into_the_whole(attention, rng, lq, lk, options):
    """Queries [a, b) x keys [c, e) with diagonal a - c + off, merged over key blocks."""
    q, k, v = random_qkv(rng, (1,), 2, 2, lq, lk, 16)
    whole_out, whole_lse = attention(q, k, v, return_lse=True, **options)
    off = 0 if options.get("causal") == "top_left" else lk - lq
    q_cuts, k_cuts = _cuts(lq, 3), _cuts(lk, 4)
    for a, b in itertools.pairwise(q_cuts):
        parts = [
            attention(
                q[..., a:b, :],
                k[..., c:e, :],
                v[..., c:e, :],
                return_lse=True,
                diagonal=a - c + off,
                **options,
            )
            for c, e in itertools.pairwise(k_cuts)
        ]
        out, lse = cpuattn.merge(*zip(*parts, strict=True))
        assert_matches(out, whole_out[..., a:b, :], F32)
        assert_matches(lse, whole_lse[..., a:b], F32, "lse")


def _cuts(n: int, parts: int) -> list[int]:
    """Uneven cut points of [0, n): not tile multiples."""
    return [0, *(n * p // parts + 3 * p for p in range(1, parts)), n]


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=str)
def test_half_precision_diagonal(attention, rng, dtype):
    q, k, v = (x.astype(dtype) for x in random_qkv(rng, (2,), 4, 2, 70, 150, 32))
    options = {"causal": True, "window": (50, 0), "diagonal": 33}
    ref_out, ref_lse = dense_attention(q, k, v, **options)
    out, lse = attention(q, k, v, return_lse=True, out_dtype=np.float32, **options)
    assert_matches(out, ref_out, F32)
    assert_matches(lse, ref_lse, F32, "lse")
    # float32 q over a half K/V cache
    out, lse = attention(q.astype(F32), k, v, return_lse=True, **options)
    assert_matches(out, dense_attention(q.astype(F32), k, v, **options)[0], F32)


def test_return_weights_use_the_diagonal(attention, rng):
    q, k, v = random_qkv(rng, (), 2, 2, 20, 50, 8)
    out, weights = attention(q, k, v, causal=True, diagonal=7, return_weights=True)
    expected = np.tril(np.ones((20, 50), bool), k=7)
    assert np.array_equal(weights[0] > 0, expected)
    assert_matches(weights @ v, out, F32)


@pytest.mark.parametrize("diagonal", [2**61, -(2**61)], ids=["far_right", "far_left"])
def test_extreme_diagonals_keep_exact_keys(attention, rng, diagonal):
    """Far past every key: a window keeps nothing (the binding must not treat a long window
    side as unbounded), causal keeps all or nothing, ALiBi distances stay finite."""
    q, k, v = random_qkv(rng, (), 2, 2, 9, 12, 8)
    _, lse = attention(q, k, v, window=(30, 30), diagonal=diagonal, return_lse=True)
    assert np.all(lse == -np.inf)
    _, lse = attention(q, k, v, causal=True, diagonal=diagonal, return_lse=True)
    assert np.all(lse == -np.inf) if diagonal < 0 else np.all(np.isfinite(lse))
    out, lse = attention(
        q, k, v, alibi_slopes=np.array([0.0, 0.0]), diagonal=diagonal, return_lse=True
    )
    assert_matches(out, dense_attention(q, k, v)[0], F32)


@pytest.mark.parametrize(
    ("window", "diagonal"),
    [
        ((-1, 2**61), 2**61),
        ((2**61 + 5, -1), -(2**61)),
        ((-1, 2**63 - 1), None),
        ((2**62, 2**62), 0),
    ],
    ids=str,
)
def test_huge_window_sides_keep_every_key(attention, rng, window, diagonal):
    """A side past every key is unbounded: no backend adds it to a diagonal (int64 overflow
    dropped every key, found by review)."""
    q, k, v = random_qkv(rng, (), 1, 1, 4, 6, 8)
    out, lse = attention(q, k, v, window=window, diagonal=diagonal, return_lse=True)
    assert np.all(np.isfinite(lse))
    ref = attention(q, k, v, window=None if diagonal is None else (-1, -1), diagonal=diagonal)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("diagonal", [2**24 + 1, 2**25 + 3, 2**40 + 7, -(2**33) + 5], ids=str)
def test_alibi_far_from_the_diagonal_matches_numpy(native, rng, diagonal):
    """ALiBi distances past 2**24 are not exact in float32: the native step takes them in
    int64 first, as NumPy does, rather than rounding the row's distance and then subtracting
    the key's (0.26 apart at 2**25, found by review)."""
    q = np.zeros((1, 1, 3, 8), F32)
    k = np.zeros((1, 1, 64, 8), F32)
    v = rng.standard_normal((1, 1, 64, 8)).astype(F32)
    kw = {"alibi_slopes": np.array([0.5]), "diagonal": diagonal}
    expected = cpuattn.attention(q, k, v, backend="numpy", **kw)
    np.testing.assert_allclose(native(q, k, v, **kw), expected, atol=1e-6)


def test_window_side_longer_than_the_sequence_is_still_a_bound(attention, rng):
    q, k, v = random_qkv(rng, (), 1, 1, 8, 8, 4)
    check(attention, q, k, v, window=(20, -1), diagonal=40)  # keys [20, ...) of 8: none
    check(attention, q, k, v, window=(-1, 20), diagonal=-40)


@pytest.mark.parametrize(
    ("diagonal", "error", "match"),
    [
        (1.5, TypeError, "diagonal: expected an int or None, got float"),
        (3.0, TypeError, "diagonal: expected an int"),
        (True, TypeError, "diagonal: expected an int"),
        ("3", TypeError, "diagonal: expected an int"),
        (np.array([1, 2]), TypeError, "diagonal: expected an int"),
        (2**61 + 1, ValueError, r"diagonal: expected an int in \[-2\*\*61, 2\*\*61\]"),
        (-(2**70), ValueError, "diagonal: expected an int in"),
    ],
    ids=["float", "integral_float", "bool", "str", "array", "too_far", "far_too_far"],
)
def test_bad_diagonal(rng, diagonal, error, match):
    q, k, v = random_qkv(rng, (), 1, 1, 4, 4, 4)
    for backend in ("numpy", "auto"):
        with pytest.raises(error, match=match):
            cpuattn.attention(q, k, v, causal=True, diagonal=diagonal, backend=backend)


def test_numpy_integer_diagonals_are_ints(attention, rng):
    q, k, v = random_qkv(rng, (), 1, 1, 6, 9, 4)
    expected = attention(q, k, v, causal=True, diagonal=2)
    for diagonal in (np.int64(2), np.int32(2), np.array(2), np.uint8(2)):
        np.testing.assert_array_equal(attention(q, k, v, causal=True, diagonal=diagonal), expected)


def test_packed_varlen_core_rejects_a_diagonal(rng):
    """attention_varlen takes no diagonal (one per sequence would be needed); the binding
    refuses one with packed sequences rather than guess."""
    core = cpuattn._native._core
    if core is None:
        pytest.skip("no native backend")
    q, k, v = random_qkv(rng, (), 1, 1, 6, 6, 4)
    cu = np.array([0, 6], np.int64)
    out = np.empty((1, 6, 4), F32)
    args = (q, k, v, out, None, None, None, 0.5, True, 0, -1, -1, 1, 0.0, None, None, cu, cu)
    with pytest.raises(ValueError, match="diagonal"):
        core.attention(*args, diagonal=3)
