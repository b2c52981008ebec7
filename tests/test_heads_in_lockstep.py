"""Decode over a cache that keeps each position's kv heads side by side (a (B, L, H, D) buffer
viewed (B, H, L, D), a paged cache) steps all kv heads of a batch entry in lockstep, key tile
by key tile (TaskPlan::heads_per_task): it reads whole positions. Each head is computed as
alone, so the result is bitwise the one of the same data laid out head by head, split-KV
chunks and partial results included."""

import ml_dtypes
import numpy as np
import pytest

import cpuattn

pytestmark = pytest.mark.skipif(not cpuattn.info()["native"], reason="native backend not built")

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int8]


def _cache(rng, b, hkv, lk, d, dtype):
    """k, v (B, L, Hkv, D) in memory, and their scales (int8), viewed (B, Hkv, L, ...)."""
    x = rng.standard_normal((2, b, lk, hkv, d)).astype(np.float32)
    if dtype == np.int8:
        (k, ks), (v, vs) = cpuattn.quantize_int8(x[0]), cpuattn.quantize_int8(x[1])
        return (
            k.swapaxes(1, 2),
            v.swapaxes(1, 2),
            {"k_scale": ks.swapaxes(1, 2), "v_scale": vs.swapaxes(1, 2)},
        )
    return x[0].astype(dtype).swapaxes(1, 2), x[1].astype(dtype).swapaxes(1, 2), {}


def _head_major(x):
    return None if x is None else np.ascontiguousarray(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "lq", "lk", "d"),
    [  # rows a head x 5 <= D: float32 K rows in place too (csrc/tiles.h), so in lockstep
        (1, 32, 8, 1, 3000, 64),
        (2, 8, 4, 1, 700, 64),
        (3, 4, 2, 4, 129, 64),
        (1, 6, 3, 2, 5000, 64),
        (2, 32, 2, 1, 900, 128),  # 16 rows a head: one whole 16-row block
        (1, 34, 2, 1, 1000, 128),  # 17: a second 16-row block begun
        (1, 48, 2, 1, 3000, 128),  # 24
        (1, 48, 2, 1, 700, 64),  # 24 rows at D = 64: float32 K packed, head by head
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_side_by_side_heads_give_the_head_major_bits(rng, dtype, b, hq, hkv, lq, lk, d, threads):
    k, v, scales = _cache(rng, b, hkv, lk, d, dtype)
    q = rng.standard_normal((b, hq, lq, d)).astype(np.float32)
    lengths = rng.integers(lk // 2, lk + 1, b)
    kw = {"kv_lengths": lengths, "causal": True, "num_threads": threads, "return_lse": True}
    out, lse = cpuattn.attention(q, k, v, **scales, **kw)
    head_major = {name: _head_major(s) for name, s in scales.items()}
    out_hm, lse_hm = cpuattn.attention(q, _head_major(k), _head_major(v), **head_major, **kw)
    np.testing.assert_array_equal(out, out_hm)
    np.testing.assert_array_equal(lse, lse_hm)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_decode_over_many_heads_and_keys(rng, dtype, block_size):
    """Split-KV chunks of every kv head of a paged cache, against the head-major copy."""
    b, hkv, lk, d = 2, 4, 2600, 32
    blocks = -(-lk // block_size)
    k, v, scales = _cache(rng, b, hkv, blocks * block_size, d, dtype)
    table = rng.permutation(b * blocks).astype(np.int32).reshape(b, blocks)

    def paged(x):  # (B, H, L, ...) -> (num_blocks, block_size, H, ...), blocks where table says
        cache = np.empty((b * blocks, block_size, hkv, *x.shape[3:]), x.dtype)
        for i in range(b):
            cache[table[i]] = np.moveaxis(x[i], 0, 1).reshape(blocks, block_size, hkv, *x.shape[3:])
        return cache

    q = rng.standard_normal((b, 4 * hkv, 1, d)).astype(np.float32)
    lengths = np.array([lk, lk - 999])
    paged_scales = {name: paged(s) for name, s in scales.items()}
    out = cpuattn.attention_paged(q, paged(k), paged(v), table, lengths, **paged_scales)
    head_major = {name: _head_major(s) for name, s in scales.items()}
    expected = cpuattn.attention(
        q, _head_major(k), _head_major(v), kv_lengths=lengths, causal=True, **head_major
    )
    np.testing.assert_array_equal(out, expected)
