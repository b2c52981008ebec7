"""bfloat16 K/V on the pair kernels (avx512_bf16 dot products, avx512_amx tiles) and on the
float32 conversion of the other ISAs: shapes that exercise their padding (odd D, D not a
multiple of 32, Dv not a multiple of 16, partial tiles, rows not a multiple of 16), views
their packing must handle, non-finite values outside a row's keys, and the accuracy each
output type promises (docs/guide/half_precision.rst)."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention

import cpuattn
from cpuattn._request import BF16

SHAPES = [  # lq, lk, d, dv
    (1, 1, 13, 16),
    (7, 129, 40, 48),
    (17, 70, 80, 80),
    (64, 200, 64, 64),
    (129, 129, 256, 256),
    (5, 300, 33, 32),
    (33, 64, 96, 16),
    (3, 65, 64, 40),
    (2, 300, 64, 64),
    (1, 129, 128, 32),  # decode: K and V rows read in place, widened as loaded
    (20, 129, 128, 32),  # one query tile of 40 rows: AMX reads K rows in place
]


def bf16_inputs(rng, lq, lk, d, dv, hq=4, hkv=2, batch=(2,)):
    q = rng.standard_normal((*batch, hq, lq, d)).astype(BF16)
    k = rng.standard_normal((*batch, hkv, lk, d)).astype(BF16)
    v = rng.standard_normal((*batch, hkv, lk, dv)).astype(BF16)
    return q, k, v


def within_bf16_bound(out, ref, v):
    scale = float(np.abs(v.astype(np.float64)).max())
    assert np.abs(out.astype(np.float64) - ref).max() <= 1e-2 * scale


@pytest.mark.parametrize(("lq", "lk", "d", "dv"), SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bf16_shapes(native, rng, lq, lk, d, dv, causal):
    q, k, v = bf16_inputs(rng, lq, lk, d, dv)
    ref, ref_lse = dense_attention(q, k, v, causal=causal)
    out, lse = native(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == BF16
    within_bf16_bound(out, ref, v)
    assert_matches(lse, ref_lse, np.float32, "lse")
    # A float32 output, or a float32 q, keeps float32 accuracy (p and q split in two).
    assert_matches(native(q, k, v, causal=causal, out_dtype=np.float32), ref, np.float32)
    q32 = rng.standard_normal(q.shape).astype(np.float32)
    assert_matches(
        native(q32, k, v, causal=causal), dense_attention(q32, k, v, causal=causal)[0], np.float32
    )


def test_bf16_views(native, rng):
    """Misaligned rows (odd element offsets and strides), negative and zero strides."""
    base = rng.standard_normal((2, 2, 301, 67)).astype(BF16)
    k = base[:, :, ::3, 1:65]  # odd offset, odd row stride
    v = base[:, :, ::-3, 2:66]  # negative row stride
    q = rng.standard_normal((2, 4, 9, 64)).astype(BF16)
    ref = dense_attention(q, k, v)[0]
    within_bf16_bound(native(q, k, v), ref, v)
    assert_matches(native(q, k, v, out_dtype=np.float32), ref, np.float32)
    kb = np.broadcast_to(k[:, :1], k.shape)  # zero head stride
    assert_matches(native(q, kb, v, out_dtype=np.float32), dense_attention(q, kb, v)[0], np.float32)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_values_outside_kept_keys(native, rng, bad):
    """inf / NaN in V and K of keys a row drops (past the causal diagonal, past kv_lengths)
    never reach it, in whole and in partial tiles."""
    q, k, v = bf16_inputs(rng, 40, 100, 64, 64)
    ref_causal = dense_attention(q, k, v, causal=True)[0]
    lengths = np.array([77, 90])
    ref_lengths = dense_attention(q[..., :1, :], k, v, kv_lengths=lengths)[0]
    k[..., 90:, :] = bad
    v[..., 90:, :] = bad
    out = native(q, k, v, causal=True, out_dtype=np.float32)  # row i keeps keys <= 60 + i
    assert_matches(out[..., :30, :], ref_causal[..., :30, :], np.float32)
    out = native(q[..., :1, :], k, v, kv_lengths=lengths, out_dtype=np.float32)
    assert_matches(out, ref_lengths, np.float32)


def test_nonfinite_kept_value_reaches_only_its_rows(native, rng):
    q, k, v = bf16_inputs(rng, 20, 64, 64, 64)
    v[:, :, 10, 5] = np.inf
    out = native(q, k, v, causal=True, out_dtype=np.float32)
    expected = cpuattn.attention(q, k, v, causal=True, out_dtype=np.float32, backend="numpy")
    assert np.array_equal(np.isinf(out), np.isinf(expected))
    assert np.array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    assert_matches(out[finite], expected[finite], np.float32)


def test_fully_masked_rows_and_variants(native, rng):
    q, k, v = bf16_inputs(rng, 33, 90, 64, 32)
    mask = rng.random((33, 90)) > 0.5
    mask[3] = False
    slopes = 2.0 ** -np.arange(1, 5)
    kw = {"mask": mask, "softcap": 5.0, "alibi_slopes": slopes}
    out, lse = native(q, k, v, return_lse=True, out_dtype=np.float32, **kw)
    ref, ref_lse = dense_attention(q, k, v, **kw)
    assert (out[..., 3, :] == 0).all()
    assert (lse[..., 3] == -np.inf).all()
    assert_matches(out, ref, np.float32)
    assert_matches(lse, ref_lse, np.float32, "lse")


def test_bitwise_equal_for_any_thread_count(native, rng):
    q, k, v = bf16_inputs(rng, 1, 5000, 128, 128, hq=8, hkv=2, batch=(1,))
    q32 = q.astype(np.float32)
    for qq in (q, q32):
        one = native(qq, k, v, num_threads=1)
        for n in (2, 3):
            assert np.array_equal(
                native(qq, k, v, num_threads=n).view(np.uint8), one.view(np.uint8)
            )


@pytest.mark.parametrize(("lq", "d", "dv"), [(1, 40, 40), (4, 80, 48), (1, 96, 96), (3, 256, 80)])
@pytest.mark.parametrize("q_dtype", [BF16, np.float32], ids=["bf16-q", "f32-q"])
def test_decode_reads_rows_in_place(native, rng, lq, d, dv, q_dtype):
    """Decode over a bfloat16 cache (K and V rows read in place and widened as loaded, on
    every ISA): float32 accuracy for a float32 output, over several key tiles (the next
    tile's rows prefetched), bottom-right causal, kv_lengths ending inside a tile."""
    q, k, v = bf16_inputs(rng, lq, 300, d, dv, hq=8, hkv=2)
    q = q.astype(q_dtype)
    lengths = np.array([300, 131])
    kw = {"causal": True, "kv_lengths": lengths}
    ref, ref_lse = dense_attention(q, k, v, **kw)
    out, lse = native(q, k, v, return_lse=True, out_dtype=np.float32, **kw)
    assert_matches(out, ref, np.float32)
    assert_matches(lse, ref_lse, np.float32, "lse")
    one = native(q, k, v, num_threads=1, **kw)
    assert np.array_equal(native(q, k, v, num_threads=2, **kw).view(np.uint8), one.view(np.uint8))
