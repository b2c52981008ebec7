"""Few query rows per kv head (decode): the native step reads K rows in place and takes each
score as a dot product along D (a fold tree reduces the per-lane partial sums), instead of
packing K^T. Up to 32 rows (query positions x heads in a GQA group, csrc/tiles.h) take this
path, float32 K only while rows x 5 <= D; more take the packed one. Shapes here
exercise its edges: D not a multiple of the vector width (the scalar tail), partial key tiles,
rows at both limits, views with any row stride, float64, and inf / NaN in K rows a query never
keeps. Half caches (float16, bfloat16) are read in place up to 32 rows at any D (bfloat16 q and
K on avx512_bf16 as float32 K, packed pairs past rows x 5 > D): bfloat16 pairs on avx512_bf16,
widened to float32 as loaded on every other ISA."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention

from cpuattn._request import BF16

CASES = [  # lq, group, lk, d; float32 K in place unless noted (float64: up to 32 rows)
    (1, 1, 1, 1),  # packed (rows x 5 > D); half caches in place
    (1, 2, 7, 13),
    (1, 8, 129, 40),  # 8 rows at D = 40: the last in place
    (8, 1, 129, 39),  # D = 39: packed
    (2, 8, 700, 80),
    (4, 4, 65, 256),
    (3, 1, 200, 17),
    (16, 1, 200, 17),  # packed
    (40, 1, 55, 17),  # packed, a tile of 55 keys: float64 AVX-512 scores in 4 + 2 + 1 vectors
    (1, 16, 1000, 80),
    (17, 1, 300, 96),
    (1, 6, 513, 33),
    (2, 4, 100, 40),
    (32, 1, 300, 165),  # 32 rows: the last in place (and a D tail)
    (33, 1, 300, 165),  # 33: packed
    (1, 16, 4096, 64),  # packed (bfloat16 q and K on avx512_bf16: pairs), split-KV decode
]


def inputs(rng, lq, group, lk, d, dtype, batch=2, hkv=2):
    q = rng.standard_normal((batch, hkv * group, lq, d)).astype(dtype)
    k = rng.standard_normal((batch, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((batch, hkv, lk, d + 3)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize(("lq", "group", "lk", "d"), CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_few_rows_match_reference(native, rng, lq, group, lk, d, dtype, causal):
    q, k, v = inputs(rng, lq, group, lk, d, dtype)
    lengths = np.array([lk, max(1, lk // 3)])
    out, lse = native(q, k, v, causal=causal, kv_lengths=lengths, return_lse=True)
    ref, ref_lse = dense_attention(q, k, v, causal=causal, kv_lengths=lengths)
    assert_matches(out, ref, dtype)
    assert_matches(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("d", [21, 64])
def test_key_row_strides(native, rng, d):
    """Odd, negative and zero row strides and a transposed base: rows are found one by one."""
    base = rng.standard_normal((2, 2, 900, d + 5)).astype(np.float32)
    q = rng.standard_normal((2, 8, 1, d)).astype(np.float32)
    v = rng.standard_normal((2, 2, 300, 24)).astype(np.float32)
    views = {
        "odd stride": base[:, :, ::3, 2 : 2 + d],
        "negative stride": base[:, :, ::-3, 1 : 1 + d],
        "zero stride": np.broadcast_to(base[:, :, :1, :d], (2, 2, 300, d)),
        "transposed": np.swapaxes(rng.standard_normal((2, 2, d, 300)).astype(np.float32), -1, -2),
    }
    for name, k in views.items():
        assert_matches(native(q, k, v), dense_attention(q, k, v)[0], np.float32, name)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_keys_outside_kept_range(native, rng, bad):
    q, k, v = inputs(rng, 2, 4, 1000, 40, np.float32)
    lengths = np.array([1000, 333])
    ref = dense_attention(q, k, v, causal=True, kv_lengths=lengths)[0]
    k[1, :, 333:, :] = bad  # past kv_lengths: never read, or read and masked
    k[0, :, 999:, :] = bad  # past the causal diagonal of query 0
    out = native(q, k, v, causal=True, kv_lengths=lengths)
    assert_matches(out[1], ref[1], np.float32)
    assert_matches(out[0, :, :1], ref[0, :, :1], np.float32)


def test_huge_scores(native, rng):
    q, k, v = inputs(rng, 1, 8, 300, 64, np.float32)
    q *= 1e3
    assert_matches(native(q, k, v), dense_attention(q, k, v)[0], np.float32)


HALF_BOUND = {"bf16": 1e-2, "f16": 2e-3}  # x max|v|, for an output in the half type
HALF_TYPE = {"bf16": BF16, "f16": np.float16}


@pytest.mark.parametrize(("lq", "group", "lk", "d"), CASES, ids=str)
@pytest.mark.parametrize("half", ["bf16", "f16"])
@pytest.mark.parametrize("q_type", ["half", "f32"])
def test_half_cache(native, rng, lq, group, lk, d, half, q_type):
    """Half K/V, read in place (bfloat16 on avx512_bf16: dot products on K rows; otherwise
    widened to float32 as loaded), with a half or float32 q: a float32 output keeps float32
    accuracy, a half one its bound."""
    q, k, v = inputs(rng, lq, group, lk, d, np.float32)
    k, v = k.astype(HALF_TYPE[half]), v.astype(HALF_TYPE[half])
    if q_type == "half":
        q = q.astype(HALF_TYPE[half])
    lengths = np.array([lk, max(1, lk // 3)])
    ref = dense_attention(q, k, v, causal=True, kv_lengths=lengths)[0]
    out = native(q, k, v, causal=True, kv_lengths=lengths, out_dtype=np.float32)
    assert_matches(out, ref, np.float32)
    out = native(q, k, v, causal=True, kv_lengths=lengths)
    bound = HALF_BOUND[half] if q_type == "half" else 2e-5
    assert np.abs(out.astype(np.float64) - ref).max() <= bound * np.abs(v.astype(np.float64)).max()


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_half_nonfinite_value_reaches_only_its_rows(native, rng, half):
    q, k, v = inputs(rng, 1, 4, 300, 64, np.float32)
    k, v = k.astype(HALF_TYPE[half]), v.astype(HALF_TYPE[half])
    v[0, 0, 100, 3] = np.inf
    mask = np.ones((2, 8, 1, 300), bool)
    mask[0, 1:, :, 100] = False  # only head 0 keeps key 100
    out = native(q, k, v, mask=mask, out_dtype=np.float32)
    assert np.isinf(out[0, 0, 0, 3])
    finite_v = v.copy()
    finite_v[0, 0, 100, 3] = 0  # what the heads that drop key 100 must see
    ref = dense_attention(q, k, finite_v, mask=mask)[0]
    assert_matches(out[0, 1:], ref[0, 1:], np.float32)
    assert_matches(out[1], ref[1], np.float32)
