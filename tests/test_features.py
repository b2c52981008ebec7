"""The contract feature by feature (DESIGN §1), on every backend, against the reference."""

import itertools

import numpy as np
import pytest
from reference import assert_matches, check, dense_attention, random_qkv

import cpuattn

F32 = np.float32


@pytest.mark.parametrize("causal", [False, True, "bottom_right", "top_left"], ids=str)
@pytest.mark.parametrize(("lq", "lk"), [(50, 50), (20, 130), (130, 20), (1, 300), (300, 1)])
def test_causal_alignments(attention, rng, causal, lq, lk):
    q, k, v = random_qkv(rng, (2,), 4, 2, lq, lk, 16)
    check(attention, q, k, v, causal=causal)


def test_causal_true_is_bottom_right(attention, rng):
    q, k, v = random_qkv(rng, (), 2, 2, 10, 40, 8)
    a = attention(q, k, v, causal=True)
    assert np.array_equal(a, attention(q, k, v, causal="bottom_right"))
    # The last query sees every key, as in KV-cache decoding.
    assert_matches(a[:, -1:], attention(q[:, -1:], k, v), F32)


def test_top_left_matches_bottom_right_when_square(attention, rng):
    q, k, v = random_qkv(rng, (), 2, 2, 64, 64, 8)
    assert_matches(
        attention(q, k, v, causal="top_left"), attention(q, k, v, causal="bottom_right"), F32
    )


@pytest.mark.parametrize(
    "window", [(0, 0), (3, 0), (0, 3), (17, 5), (-1, 4), (6, -1), (-1, -1), (200, 200)], ids=str
)
@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=str)
@pytest.mark.parametrize(("lq", "lk"), [(100, 100), (40, 150), (150, 40)])
def test_window(attention, rng, window, causal, lq, lk):
    q, k, v = random_qkv(rng, (1,), 2, 1, lq, lk, 8)
    check(attention, q, k, v, window=window, causal=causal)


def test_rows_before_the_diagonal_are_empty(attention, rng):
    """Lq > Lk with bottom-right causal: the first Lq - Lk queries keep no key."""
    q, k, v = random_qkv(rng, (), 3, 3, 40, 10, 8)
    out, lse = check(attention, q, k, v, causal=True)
    assert np.all(out[:, :30] == 0)
    assert np.all(lse[:, :30] == -np.inf)
    assert np.all(np.isfinite(lse[:, 30:]))


@pytest.mark.parametrize(
    "mask_shape",
    [
        (70,),
        (1, 70),
        (25, 70),
        (4, 1, 1),
        (4, 25, 70),
        (1, 4, 1, 70),
        (2, 1, 25, 70),
        (2, 4, 25, 70),
        (2, 4, 25, 1),
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("kind", ["bool", "float", "float64_for_f32"])
def test_masks_broadcast(attention, rng, mask_shape, kind):
    q, k, v = random_qkv(rng, (2,), 4, 2, 25, 70, 16)
    if kind == "bool":
        mask = rng.random(mask_shape) > 0.3
    else:
        mask = rng.standard_normal(mask_shape) * 3
        mask[rng.random(mask_shape) < 0.2] = -np.inf
        mask = mask.astype(F32 if kind == "float" else np.float64)
    check(attention, q, k, v, mask=mask)
    check(attention, q, k, v, mask=mask, causal=True, window=(30, -1))


def test_bool_mask_equals_float_mask(attention, rng):
    q, k, v = random_qkv(rng, (2,), 4, 4, 25, 70, 16)
    keep = rng.random((2, 4, 25, 70)) > 0.5
    additive = np.where(keep, 0, -np.inf).astype(F32)
    assert_matches(attention(q, k, v, mask=keep), attention(q, k, v, mask=additive), F32)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_and_neg_inf(attention, rng, kind):
    q, k, v = random_qkv(rng, (2,), 2, 2, 9, 30, 8)
    keep = rng.random((2, 2, 9, 30)) > 0.5
    keep[0, 1, 3] = False
    keep[1, :, :] = False
    mask = keep if kind == "bool" else np.where(keep, 0.0, -np.inf).astype(F32)
    out, lse = check(attention, q, k, v, mask=mask)
    assert np.all(out[0, 1, 3] == 0)
    assert lse[0, 1, 3] == -np.inf
    assert np.all(out[1] == 0)
    assert np.all(lse[1] == -np.inf)


@pytest.mark.parametrize("lengths", [[70, 33, 1, 0], [0, 0, 0, 0], 50], ids=str)
@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=str)
def test_kv_lengths(attention, rng, lengths, causal):
    q, k, v = random_qkv(rng, (4,), 4, 2, 12, 70, 16)
    out, _lse = check(attention, q, k, v, kv_lengths=lengths, causal=causal)
    lengths = np.broadcast_to(lengths, (4,))
    # Padding is never read: garbage (NaN) beyond each length changes nothing.
    k2, v2 = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        k2[b, :, n:] = np.nan
        v2[b, :, n:] = np.nan
    assert np.array_equal(attention(k=k2, v=v2, q=q, kv_lengths=lengths, causal=causal), out)


def test_kv_lengths_multi_batch(attention, rng):
    q, k, v = random_qkv(rng, (2, 3), 2, 1, 5, 40, 8)
    lengths = np.array([[40, 3, 0], [17, 22, 1]], dtype=np.int32)
    check(attention, q, k, v, kv_lengths=lengths, causal=True, window=(4, 0))


@pytest.mark.parametrize("batch", [(), (3,), (2, 3), (2, 1, 2)], ids=str)
def test_batch_ranks(attention, rng, batch):
    q, k, v = random_qkv(rng, batch, 4, 2, 9, 13, 8, dv=5)
    out = check(attention, q, k, v, causal=True)[0]
    assert out.shape == (*batch, 4, 9, 5)


def test_two_dim_inputs(attention, rng):
    q = rng.standard_normal((9, 8)).astype(F32)
    k = rng.standard_normal((13, 8)).astype(F32)
    v = rng.standard_normal((13, 3)).astype(F32)
    out, lse = check(attention, q, k, v, causal=True, mask=rng.random((9, 13)) > 0.2)
    assert out.shape == (9, 3)
    assert lse.shape == (9,)
    buf = np.zeros((9, 3), F32)
    assert attention(q, k, v, out=buf) is buf


def test_batched_mask_over_unmergeable_batch_dims(attention, rng):
    """A mask that varies over the inner batch dim only: a view with strides (0, s)."""
    q, k, v = random_qkv(rng, (2, 3), 2, 2, 6, 11, 8)
    check(attention, q, k, v, mask=rng.random((3, 1, 6, 11)) > 0.3)


@pytest.mark.parametrize("scale", [None, 0.0, 0.05, 1.0, -0.3])
def test_scale(attention, rng, scale):
    q, k, v = random_qkv(rng, (1,), 2, 2, 20, 30, 16)
    check(attention, q, k, v, scale=scale)


def test_default_scale_is_inverse_sqrt_d(attention, rng):
    q, k, v = random_qkv(rng, (1,), 2, 2, 20, 30, 16)
    assert_matches(attention(q, k, v), attention(q, k, v, scale=0.25), F32)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed_last"])
def test_out_argument(attention, rng, layout):
    q, k, v = random_qkv(rng, (2,), 4, 2, 15, 20, 8, dv=6)
    if layout == "contiguous":
        out = np.empty((2, 4, 15, 6), F32)
    elif layout == "strided":
        out = np.zeros((2, 15, 4, 12), F32).swapaxes(1, 2)[..., ::2]
    else:
        out = np.zeros((6, 15, 4, 2), F32).T
    result, _lse = attention(q, k, v, out=out, causal=True, return_lse=True)
    assert result is out
    assert_matches(out, dense_attention(q, k, v, causal=True)[0], F32)


def test_out_aliasing_an_input(attention, rng):
    q, k, v = random_qkv(rng, (2,), 4, 4, 15, 15, 8)
    expected = attention(q, k, v)
    q2 = q.copy()
    assert attention(q2, k, v, out=q2) is q2
    assert_matches(q2, expected, F32)
    v2 = v.copy()
    attention(q, k, v2, out=v2)  # v itself is overwritten while still needed by other rows
    assert_matches(v2, expected, F32)


def test_out_overlapping_itself(attention, rng):
    """An out whose elements share memory (as_strided) is written as NumPy would write it:
    computed aside, then copied, so no two threads race on the same bytes."""
    q, k, v = random_qkv(rng, (), 8, 8, 256, 64, 32)
    buf = np.zeros(64, F32)
    out = np.lib.stride_tricks.as_strided(buf, (8, 256, 32), (0, 0, 4))
    expected = attention(q, k, v)
    assert attention(q, k, v, out=out) is out
    aside = np.zeros(64, F32)
    np.lib.stride_tricks.as_strided(aside, (8, 256, 32), (0, 0, 4))[...] = expected
    assert np.array_equal(buf, aside)


@pytest.mark.parametrize(
    ("shape", "strides", "overlaps"),
    [
        ((2, 3), (12, 4), False),
        ((2, 3), (4, 8), False),
        ((2, 3), (8, 4), True),
        ((4, 1, 3), (0, 4, 4), True),
        ((1, 5), (0, 4), False),
        ((0, 5), (0, 4), False),
        ((3, 2), (-8, 4), False),
    ],
)
def test_self_overlap_test(shape, strides, overlaps):
    from cpuattn._api import _may_overlap_itself

    buf = np.zeros(64, F32)
    a = np.lib.stride_tricks.as_strided(buf[32:], shape, strides)
    assert _may_overlap_itself(a) is overlaps


def test_zero_sizes(attention, rng):
    for shape_q, shape_k, dv in [
        ((2, 0, 5, 8), (2, 0, 7, 8), 8),
        ((2, 4, 0, 8), (2, 2, 7, 8), 3),
        ((0, 4, 5, 8), (0, 2, 7, 8), 8),
        ((2, 4, 5, 8), (2, 2, 7, 8), 0),
    ]:
        q = rng.standard_normal(shape_q).astype(F32)
        k = rng.standard_normal(shape_k).astype(F32)
        v = rng.standard_normal((*shape_k[:-1], dv)).astype(F32)
        out, lse = attention(q, k, v, return_lse=True)
        assert out.shape == (*shape_q[:-1], dv)
        assert lse.shape == shape_q[:-1]
    # Lk = 0: every row is empty.
    q, k, v = random_qkv(rng, (1,), 2, 2, 4, 0, 8)
    out, lse = attention(q, k, v, return_lse=True)
    assert np.all(out == 0)
    assert np.all(lse == -np.inf)
    # D = 0: all scores are 0, so attention is the mean of the values.
    q, k, v = random_qkv(rng, (1,), 2, 2, 4, 6, 0, dv=3)
    assert_matches(
        attention(q, k, v), np.broadcast_to(v.mean(axis=-2, keepdims=True), (1, 2, 4, 3)), F32
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_merge_of_kv_chunks_equals_whole(attention, rng, dtype):
    q, k, v = random_qkv(rng, (2,), 4, 2, 30, 200, 16, dtype=dtype)
    whole, whole_lse = attention(q, k, v, return_lse=True, causal=True)
    cuts = [0, 1, 64, 150, 200]
    outs, lses = [], []
    for a, b in itertools.pairwise(cuts):
        # Each chunk: keys [a, b) with the causal bound of the whole (expressed as a mask).
        i = np.arange(30)[:, None]
        j = np.arange(a, b)[None, :]
        o, lse = attention(q, k[..., a:b, :], v[..., a:b, :], mask=j <= i + 170, return_lse=True)
        outs.append(o)
        lses.append(lse)
    out, lse = cpuattn.merge(outs, lses)
    assert_matches(out, whole, dtype)
    assert_matches(lse, whole_lse, dtype, "lse")


def test_merge_empty_parts(rng):
    out = rng.standard_normal((3, 4)).astype(F32)
    lse = np.array([0.5, -np.inf, 2.0], F32)
    empty = np.zeros_like(out), np.full(3, -np.inf, F32)
    merged, merged_lse = cpuattn.merge([out, empty[0]], [lse, empty[1]])
    assert np.array_equal(merged_lse, lse)
    assert np.array_equal(merged[[0, 2]], out[[0, 2]])
    assert np.all(merged[1] == 0)
    assert merged.dtype == F32


def test_merge_of_a_nan_part_gives_a_nan_row(rng):
    """A part whose lse is NaN makes that row NaN, as a NaN in what a row uses does in the
    whole call, even where that part's out is finite (it was 0, found in review); other rows
    are untouched."""
    out = rng.standard_normal((3, 4)).astype(F32)
    lse = np.array([0.5, np.nan, 2.0], F32)
    merged, merged_lse = cpuattn.merge([out, out], [lse, np.zeros(3, F32)])
    assert np.isnan(merged[1]).all()
    assert np.isnan(merged_lse[1])
    assert np.isfinite(merged[[0, 2]]).all()
    assert np.isfinite(merged_lse[[0, 2]]).all()


@pytest.mark.parametrize("half", [np.float16, "bfloat16"], ids=["f16", "bf16"])
def test_merge_of_half_parts_works_in_float32(attention, rng, half):
    """Half parts as attention returns them (out in the half dtype, lse float32): merged in
    float32, out back in the half dtype, lse float32."""
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16 if half == "bfloat16" else half)
    q, k, v = (x.astype(dtype) for x in random_qkv(rng, (2,), 4, 2, 30, 200, 16))
    parts = [
        attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True)
        for a, b in [(0, 70), (70, 200)]
    ]
    assert parts[0][0].dtype == dtype
    assert parts[0][1].dtype == F32
    out, lse = cpuattn.merge(*zip(*parts, strict=True))
    assert out.dtype == dtype
    assert lse.dtype == F32
    # The same merge on the parts' values in float32, rounded once at the end.
    out32, lse32 = cpuattn.merge([o.astype(F32) for o, _ in parts], [x for _, x in parts])
    assert np.array_equal(lse, lse32)
    assert np.array_equal(out, out32.astype(dtype))
    whole, whole_lse = attention(q, k, v, return_lse=True, out_dtype=F32)
    bound = (2e-2 if half == "bfloat16" else 4e-3) * float(np.abs(whole).max())  # 2 roundings
    np.testing.assert_allclose(out.astype(F32), whole, rtol=0, atol=bound)
    assert_matches(lse, whole_lse, F32, "lse")
    # float64 parts stay float64, lse too.
    out64, lse64 = cpuattn.merge([o.astype(np.float64) for o, _ in parts], [x for _, x in parts])
    assert out64.dtype == lse64.dtype == np.float64


def test_threads_bitwise_identical(native, rng):
    q, k, v = random_qkv(rng, (2,), 8, 2, 300, 500, 32)
    kw = {
        "causal": True,
        "window": (200, -1),
        "kv_lengths": [500, 321],
        "return_lse": True,
        "mask": rng.random((8, 300, 1)) > 0.1,
    }
    one = native(q, k, v, num_threads=1, **kw)
    for threads in (2, 3, 7):
        many = native(q, k, v, num_threads=threads, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(one, many, strict=True))


def test_info():
    info = cpuattn.info()
    assert info["version"] == cpuattn.__version__
    assert set(info) >= {
        "native",
        "native_error",
        "isa",
        "supported_isas",
        "openmp",
        "max_threads",
        "backends",
    }
    if info["native"]:
        assert info["isa"] in info["supported_isas"]
        assert info["max_threads"] >= 1


def test_native_extension_is_built():
    from conftest import native_required

    if native_required():
        assert cpuattn.info()["native"], cpuattn.info()["native_error"]


def test_docstring_examples():
    import doctest

    from cpuattn import _api

    failures, tried = doctest.testmod(_api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 2
    assert failures == 0
