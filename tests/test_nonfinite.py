"""NaN and inf inputs reach exactly the rows that use them (docs/guide/errors.rst).

A row's output depends only on its q row, its mask row and the K/V rows of the keys it keeps;
a key it drops (bool mask, -inf additive mask, causal, window, kv_lengths) never affects it,
whatever that key's K and V hold. Each test plants non-finite values, then checks the clean
rows against the same call on finite data and the poisoned rows for NaN.
"""

import numpy as np
import pytest
from reference import assert_matches, random_qkv

import cpuattn

F32 = np.float32


def clean_rows_match(attention, dirty, clean, clean_rows, **kw):
    """`clean_rows` (bool over (H, Lq)) of the dirty call equal the clean call's, bit for bit
    on the same backend: the non-finite values never took part in their arithmetic."""
    out, lse = attention(*dirty, return_lse=True, **kw)
    ref_out, ref_lse = attention(*clean, return_lse=True, **kw)
    assert np.array_equal(out[clean_rows], ref_out[clean_rows])
    assert np.array_equal(lse[clean_rows], ref_lse[clean_rows])
    return out, lse


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_dropped_keys_holding_nan_do_not_matter(attention, rng, mask_kind):
    q, k, v = random_qkv(rng, (), 4, 2, 70, 150, 16)
    dropped = np.zeros(150, bool)
    dropped[[0, 3, 64, 65, 100, 149]] = True
    kd, vd = k.copy(), v.copy()
    kd[:, dropped] = np.nan
    vd[:, dropped] = np.inf
    mask = ~dropped if mask_kind == "bool" else np.where(dropped, -np.inf, 0.5).astype(F32)
    out, _ = clean_rows_match(attention, (q, kd, vd), (q, k, v), np.ones((4, 70), bool), mask=mask)
    assert np.isfinite(out).all()


def test_padding_past_kv_lengths_is_never_read(attention, rng):
    q, k, v = random_qkv(rng, (3,), 4, 1, 1, 300, 32)
    lengths = np.array([0, 77, 300])
    kd, vd = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        kd[b, :, n:] = np.nan
        vd[b, :, n:] = np.nan
    out, lse = clean_rows_match(
        attention, (q, kd, vd), (q, k, v), np.ones((3, 4, 1), bool), kv_lengths=lengths, causal=True
    )
    assert np.isfinite(out).all()
    assert np.all(lse[0] == -np.inf)


@pytest.mark.parametrize("causal", [True, "top_left"], ids=str)
def test_causal_future_keys_holding_nan_do_not_matter(attention, rng, causal):
    q, k, v = random_qkv(rng, (), 2, 2, 130, 130, 8)
    kd, vd = k.copy(), v.copy()
    kd[:, 100:] = np.nan
    vd[:, 100:] = -np.inf
    rows = np.zeros((2, 130), bool)
    rows[:, :100] = True  # rows i < 100 keep keys j <= i only
    out, _ = clean_rows_match(attention, (q, kd, vd), (q, k, v), rows, causal=causal)
    assert np.isnan(out[:, 100:]).all()


def test_nan_key_poisons_exactly_the_rows_that_keep_it(attention, rng):
    q, k, v = random_qkv(rng, (), 2, 1, 40, 90, 8)
    kd = k.copy()
    kd[0, 70] = np.nan
    rows = np.zeros((2, 40), bool)
    rows[:, :20] = True  # window (9, 0) bottom-right: row i keeps keys [i + 41, i + 50]
    out, lse = clean_rows_match(attention, (q, kd, v), (q, k, v), rows, causal=True, window=(9, 0))
    assert np.isnan(out[:, 20:30]).all()
    assert np.isnan(lse[:, 20:30]).all()
    assert not np.isnan(out[:, 30:]).any()


def test_nan_query_row_stays_in_its_row(attention, rng):
    q, k, v = random_qkv(rng, (2,), 4, 2, 9, 33, 8)
    qd = q.copy()
    qd[1, 2, 5, 3] = np.nan
    rows = np.ones((2, 4, 9), bool)
    rows[1, 2, 5] = False
    out, _ = clean_rows_match(attention, (qd, k, v), (q, k, v), rows)
    assert np.isnan(out[1, 2, 5]).all()


def test_inf_value_reaches_only_its_column_of_the_rows_that_keep_it(attention, rng):
    q, k, v = random_qkv(rng, (), 1, 1, 20, 64, 8)
    vd = v.copy()
    vd[0, 40, 2] = np.inf
    rows = np.zeros((1, 20), bool)
    rows[:, 11:] = True  # bottom-right, window (14, 0): row i keeps keys [i + 30, i + 44]
    out, _ = clean_rows_match(
        attention, (q, k, vd), (q, k, v), rows, causal="bottom_right", window=(14, 0)
    )
    kept = out[0, :11]
    assert np.all(kept[:, 2] == np.inf)
    assert np.isfinite(np.delete(kept, 2, axis=1)).all()


def test_huge_score_after_an_inf_value_drops_it(attention, rng):
    """A later key whose weight dwarfs everything rescales the old state by exactly 0; an inf
    collected earlier must vanish with it, not turn into 0 * inf = NaN."""
    q = np.ones((1, 1, 4), F32)
    k = np.zeros((1, 300, 4), F32)
    v = rng.standard_normal((1, 300, 4)).astype(F32)
    v[0, 5] = np.inf
    k[0, 299] = 100.0  # score 200 vs 0: exp(-200) is 0 in float32
    out = attention(q, k, v)
    assert_matches(out, v[:, 299:], F32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_backends_agree_on_non_finite_outputs(attention, rng, value):
    q, k, v = random_qkv(rng, (2,), 2, 1, 50, 140, 12)
    for arr, idx in (
        (q, (0, 1, 7, 3)),
        (k, (1, 0, 99, 0)),
        (v, (0, 0, 12, 5)),
        (v, (1, 0, 130, 11)),
    ):
        arr[idx] = value
    mask = rng.random((50, 140)) > 0.2
    out, lse = attention(q, k, v, mask=mask, return_lse=True, window=(60, 3))
    ref_out, ref_lse = cpuattn.attention(
        q, k, v, mask=mask, return_lse=True, window=(60, 3), backend="numpy"
    )
    assert np.array_equal(np.isnan(out), np.isnan(ref_out))
    assert np.array_equal(np.isinf(out), np.isinf(ref_out))
    finite = np.isfinite(ref_out)
    np.testing.assert_allclose(out[finite], ref_out[finite], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("lk", "dv"), [(30, 32), (16, 16), (40, 32)], ids=str)
def test_inf_value_of_a_dropped_key_in_a_short_tile(attention, rng, lk, dv):
    """Sentence-sized heads (AVX-512: rows in blocks of 8 when a tile's scores and Dv are at
    most two vectors): an inf in V reaches only the rows that keep its key."""
    q = rng.standard_normal((2, 2, 27, 32)).astype(F32)
    k = rng.standard_normal((2, 2, lk, 32)).astype(F32)
    v = rng.standard_normal((2, 2, lk, dv)).astype(F32)
    v[0, 1, 5, 3] = np.inf
    mask = rng.random((27, lk)) > 0.3
    out = attention(q, k, v, mask=mask)
    ref = cpuattn.attention(q, k, v, mask=mask, backend="numpy")
    assert np.array_equal(np.isinf(out), np.isinf(ref))
    assert not np.isnan(out).any()
    finite = np.isfinite(ref)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=1e-4, atol=1e-5)
    assert np.isinf(out[0, 1, mask[:, 5], 3]).all()


@pytest.mark.parametrize(("lk", "dv"), [(32, 32), (16, 16)], ids=str)
def test_inf_value_kept_by_every_row_of_a_short_tile(native, rng, lk, dv):
    """No key dropped and a tile of whole vectors: the narrow blocks' fast P.V (no weight is
    0), an inf in V is inf in its column of every row of its head."""
    q = rng.standard_normal((1, 2, 27, 32)).astype(F32)
    k = rng.standard_normal((1, 2, lk, 32)).astype(F32)
    v = rng.standard_normal((1, 2, lk, dv)).astype(F32)
    v[0, 1, 5, 3] = np.inf
    out = native(q, k, v)
    assert np.all(out[0, 1, :, 3] == np.inf)
    assert np.isfinite(np.delete(out[0, 1], 3, axis=-1)).all()
    assert np.isfinite(out[0, 0]).all()


@pytest.mark.parametrize(
    ("lq", "lk", "dv"), [(64, 64, 32), (1, 2000, 40), (70, 130, 48), (40, 48, 32)], ids=str
)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_inf_value_kept_by_every_row_is_inf_with_half_kv(attention, rng, lq, lk, dv, out_dtype):
    """Every row keeps every key, so an inf in V is inf in its column of every row, on every
    ISA: the bfloat16 steps split a float32 row's weights as p_hi + p_lo, and p_lo is exactly
    0 for the row's largest weight (0 * inf would be NaN). A tile of 48 keys has no weight of
    0 at all (the softmax covers its three vectors only): the packed pair step's fast path."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    q = rng.standard_normal((2, 4, lq, 64)).astype(F32 if out_dtype == "float32" else bf16)
    k = rng.standard_normal((2, 2, lk, 64)).astype(bf16)
    v = rng.standard_normal((2, 2, lk, dv)).astype(bf16)
    col = dv - 1  # in the packing's 32-column blocks for dv = 32, past them otherwise
    v[1, 0, 3, col] = np.inf
    out = np.asarray(attention(q, k, v), dtype=np.float64)
    assert np.all(out[1, :2, :, col] == np.inf)
    assert np.isfinite(np.delete(out[1, :2], col, axis=-1)).all()
    assert np.isfinite(out[0]).all()
    assert np.isfinite(out[1, 2:]).all()


@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16"])
def test_inf_value_of_an_unread_key_leaves_rows_bitwise_with_half_kv(attention, rng, q_dtype):
    """Key 126's V row holds inf; causal rows i < 66 never keep it, and its tile is staged for
    the rows that do: the query tile of rows 0-63 must come out bit for bit as without the inf
    (the bfloat16 steps once sent every step on that staged tile down their inf-safe path,
    found by review). Rows 64 and 65 share a step with rows that keep key 126, and AMX reads
    V in 32-key chunks (key 126 is in one every step of this key tile reads): there the
    bfloat16 steps' inf-safe path rounds the weights differently (the float step's does not),
    so those rows match to rounding only (docs/guide/errors.rst)."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    q = rng.standard_normal((2, 70, 64)).astype(F32 if q_dtype == "float32" else bf16)
    k = rng.standard_normal((2, 130, 64)).astype(bf16)
    v = rng.standard_normal((2, 130, 32)).astype(bf16)
    vd = v.copy()
    vd[:, 126, 3] = np.inf
    amx = attention.keywords["backend"] == "native" and cpuattn._native._core.isa() == "avx512_amx"
    bitwise = 0 if amx else 64  # bottom-right: row i keeps keys j <= i + 60
    rows = np.zeros((2, 70), bool)
    rows[:, :bitwise] = True
    out, _ = clean_rows_match(attention, (q, k, vd), (q, k, v), rows, causal=True)
    ref = attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :66], ref[:, :66], rtol=1e-2, atol=1e-2)
