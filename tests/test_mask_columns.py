"""Masks that drop whole key tiles or a tile's last keys (csrc/mask_columns.h): a padded batch,
causal or window patterns given as masks, left padding, one far key kept by a single row. The
native steps skip those keys; every backend must still match the float64 reference, keep
every key some row keeps (the scan reads every row, strided and broadcast masks included),
and give each sequence of a padded batch the bits it gets alone."""

import functools

import numpy as np
import pytest
from reference import check, dense_attention, random_qkv

import cpuattn

# Key counts around the 64-key tiles: the scan's end falls on both sides of a tile edge.
LENGTHS = [1, 5, 63, 64, 65, 127, 128, 129, 200]


def padding_mask(lengths, lk, left=False):
    """(B, 1, 1, Lk) bool: sequence b keeps its first (or, left-padded, its last) lengths[b]
    keys."""
    j = np.arange(lk)[None, :]
    n = np.asarray(lengths)[:, None]
    keep = j >= lk - n if left else j < n
    return keep[:, None, None, :]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("lq", [1, 7, 130])
def test_padded_batch(attention, lq, left):
    rng = np.random.default_rng(lq)
    lk = 200
    q, k, v = random_qkv(rng, (len(LENGTHS),), 4, 2, lq, lk, 40)
    check(attention, q, k, v, mask=padding_mask(LENGTHS, lk, left))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize(("lq", "lk"), [(129, 129), (70, 200), (200, 70)])
def test_causal_as_mask(attention, mask_kind, lq, lk):
    """A bottom-right causal pattern as a mask: the tiles above the diagonal keep no key."""
    rng = np.random.default_rng(lq + lk)
    q, k, v = random_qkv(rng, (2,), 4, 4, lq, lk, 32)
    keep = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
    mask = keep if mask_kind == "bool" else np.where(keep, 0.0, -np.inf).astype(np.float32)
    check(attention, q, k, v, mask=mask)
    out = attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out, attention(q, k, v, causal=True), rtol=0, atol=2e-6)


@pytest.mark.parametrize("row", [0, 1, 37, 63, 64, 99])
@pytest.mark.parametrize("key", [0, 63, 64, 127, 130])
def test_one_row_keeps_a_far_key(attention, row, key):
    """Every row keeps keys [0, 3); one row also keeps one far key: the extent of a tile is the
    largest over all its rows, not the first row's."""
    rng = np.random.default_rng(row * 131 + key)
    lq, lk = 100, 131
    q, k, v = random_qkv(rng, (), 2, 1, lq, lk, 16)
    v[..., key, :] += 5.0  # the far key's value stands out in that row's output
    keep = np.zeros((lq, lk), bool)
    keep[:, :3] = True
    keep[row, key] = True
    check(attention, q, k, v, mask=keep)


def test_last_key_of_a_tile_only(attention):
    """Each row keeps exactly one key, the last of a tile or the first: extents of 64 and 1."""
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, (), 2, 2, 9, 192, 24)
    keep = np.zeros((9, 192), bool)
    for i, j in enumerate([63, 64, 127, 128, 191, 0, 65, 126, 190]):
        keep[i, j] = True
    check(attention, q, k, v, mask=keep)


@pytest.mark.parametrize(
    "layout", ["transposed", "reversed", "broadcast over keys", "per head", "strided rows"]
)
def test_mask_layouts(attention, layout):
    """The scan reads the mask with its strides: not contiguous, negative, zero, per head."""
    rng = np.random.default_rng(11)
    b, h, lq, lk = 3, 4, 70, 150
    q, k, v = random_qkv(rng, (b,), h, h, lq, lk, 16)
    lengths = np.array([[1, 64, 65, 150], [130, 2, 63, 128], [66, 149, 10, 64]])
    keep = np.arange(lk) < lengths[..., None]  # (B, H, Lk)
    if layout == "transposed":
        mask = np.ascontiguousarray(np.broadcast_to(keep[:, :, None, :], (b, h, lq, lk)))
        mask = np.swapaxes(np.ascontiguousarray(np.swapaxes(mask, -1, -2)), -1, -2)
    elif layout == "reversed":
        mask = np.ascontiguousarray(keep[:, :, None, ::-1])[..., ::-1]
    elif layout == "broadcast over keys":
        mask = rng.random((b, h, lq, 1)) < 0.7
    elif layout == "per head":
        mask = keep[:, :, None, :]
    else:
        big = np.zeros((b, h, 2 * lq, 3 * lk), bool)
        big[:, :, ::2, ::3] = keep[:, :, None, :]
        mask = big[:, :, ::2, ::3]
    check(attention, q, k, v, mask=mask)


def test_float_mask_values(attention):
    """Only -inf drops a key: the most negative float, a large negative bias and NaN keep it
    (NaN makes its row NaN, on every backend); rows that keep nothing give 0 and lse -inf."""
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, (), 1, 1, 6, 140, 8)
    mask = np.full((6, 140), -np.inf, np.float32)
    mask[0, 139] = np.finfo(np.float32).min
    mask[1, 65] = -1e30
    mask[2, :64] = 0.0
    mask[3, 127] = 2.0
    # rows 4 and 5 keep nothing
    check(attention, q, k, v, mask=mask)
    mask[0, 139] = np.nan
    out = attention(q, k, v, mask=mask)
    assert np.isnan(out[0, 0]).all()
    assert not np.isnan(out[0, 1:]).any()


def test_nonfinite_keys_past_the_kept_ones(attention):
    """inf and NaN in K and V rows the mask drops, inside and past the kept tiles: no row sees
    them."""
    rng = np.random.default_rng(8)
    lk = 190
    q, k, v = random_qkv(rng, (3,), 2, 2, 20, lk, 32)
    lengths = [30, 64, 100]
    for b, n in enumerate(lengths):
        k[b, :, n:] = np.nan
        v[b, :, n:] = np.inf
    out = attention(q, k, v, mask=padding_mask(lengths, lk))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(
            out[b], dense_attention(q[b], k[b, :, :n], v[b, :, :n])[0], rtol=0, atol=2e-6
        )


@pytest.mark.parametrize("num_threads", [1, 2])
def test_decode_over_a_padded_cache(native, num_threads):
    """Decode (one query, GQA, the heads-in-lockstep and split-KV paths) over caches padded per
    sequence and per head."""
    rng = np.random.default_rng(num_threads)
    lk = 1100
    q, k, v = random_qkv(rng, (4,), 8, 2, 1, lk, 64)
    lengths = [1, 64, 700, 1100]
    threaded = functools.partial(native, num_threads=num_threads)
    check(threaded, q, k, v, mask=padding_mask(lengths, lk))
    per_head = np.arange(lk) < rng.integers(1, lk, (4, 8, 1, 1))
    check(threaded, q, k, v, mask=per_head)
    # One sequence, one kv head: split-KV, whose later chunks keep no key at all.
    for n in (1, 100, 600):
        check(threaded, q[:1], k[:1, :1], v[:1, :1], mask=padding_mask([n], lk))


def test_padded_sequence_has_its_own_bits(native):
    """A sequence padded into a batch gives bit for bit what it gives alone (the dropped keys
    add exactly nothing), and the thread count changes no bit."""
    rng = np.random.default_rng(21)
    lk = 200
    q, k, v = random_qkv(rng, (len(LENGTHS),), 4, 2, 33, lk, 32)
    mask = padding_mask(LENGTHS, lk)
    batch = native(q, k, v, mask=mask, num_threads=1)
    assert np.array_equal(batch, native(q, k, v, mask=mask, num_threads=2))
    for b, n in enumerate(LENGTHS):
        alone = native(q[b], k[b, :, :n], v[b, :, :n], num_threads=1)
        assert np.array_equal(batch[b], alone), f"sequence {b} ({n} keys)"


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_padded_batch_other_dtypes(native, dtype):
    """The bfloat16 steps (vdpbf16ps / AMX pairs: whole pairs and tiles of keys) and float64
    agree with the NumPy backend on a padded batch."""
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float64
    rng = np.random.default_rng(2)
    lk = 200
    q, k, v = (x.astype(dt) for x in random_qkv(rng, (len(LENGTHS),), 4, 4, 70, lk, 64))
    mask = padding_mask(LENGTHS, lk)
    ours = native(q, k, v, mask=mask).astype(np.float64)
    ref = cpuattn.attention(q, k, v, mask=mask, backend="numpy").astype(np.float64)
    bound = 2e-2 if dtype == "bfloat16" else 1e-12
    np.testing.assert_allclose(ours, ref, rtol=0, atol=bound)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", ["padded", "left-padded", "causal", "one far key"])
def test_backward_skips_dropped_tiles(backward, pattern, dtype):
    """Gradients where the mask drops whole 64 x 64 tiles: every backend (the native one skips
    them) agrees with the float64 NumPy backward, and dK, dV of keys no row keeps are 0."""
    import ml_dtypes

    rng = np.random.default_rng(len(pattern))
    b, h, lq, lk = 3, 2, 130, 200
    q, k, v = random_qkv(rng, (b,), h, h, lq, lk, 32)
    lengths = [1, 64, 150]
    if pattern in ("padded", "left-padded"):
        mask = padding_mask(lengths, lk, left=pattern == "left-padded")
    elif pattern == "causal":
        mask = np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
    else:
        mask = np.zeros((lq, lk), bool)
        mask[:, :2] = True
        mask[100, 190] = True
    if dtype == "bfloat16":
        q, k, v = (x.astype(ml_dtypes.bfloat16) for x in (q, k, v))
    dout = rng.standard_normal((b, h, lq, 32)).astype(q.dtype)
    out, lse = cpuattn.attention(q, k, v, mask=mask, return_lse=True, backend="numpy")
    grads = backward(dout, q, k, v, out.astype(q.dtype), lse, mask=mask)
    wide = [x.astype(np.float64) for x in (dout, q, k, v)]
    out64, lse64 = cpuattn.attention(*wide[1:], mask=mask, return_lse=True, backend="numpy")
    expected = cpuattn.attention_backward(*wide, out64, lse64, mask=mask, backend="numpy")
    bound = 5e-2 if dtype == "bfloat16" else 1e-4
    for name, got, want in zip("qkv", grads, expected, strict=True):
        got = np.asarray(got, np.float64)
        scale = max(np.abs(want).max(), 1.0)
        assert np.abs(got - want).max() <= bound * scale, f"d{name}"
    kept = np.broadcast_to(mask, (b, 1, lq, lk)).any(axis=(1, 2))  # (B, Lk)
    for grad in grads[1:]:
        assert not np.asarray(grad, np.float64)[~np.broadcast_to(kept[:, None], (b, h, lk))].any()
