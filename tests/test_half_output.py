"""A float16 or bfloat16 result is the float32 result rounded to nearest even, bit for bit
(NaN: in the same places, its sign and payload not compared), on every ISA: the kernels round
whole output rows (EncodingOps::from_float), vectorized, with convert.h's rules (vcvtps2ph
for float16, integer rounding for bfloat16, which keeps subnormals that vcvtneps2bf16 would
flush). Row widths with and without a vector tail, results near float16's largest value and
in its subnormals, NaN rows, prefill and decode, with and without lse; split-KV decode (its
merge writes the rows) and float16 results past 65504 (an int8 cache's scales) on their own."""

import ml_dtypes
import numpy as np
import pytest

import cpuattn

F16, BF16 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)


def bits(x):
    return np.asarray(x).view(np.uint16)


def assert_rounded(out, wide, dtype):
    """out is wide rounded to dtype: NaN in the same places, every other element's bits."""
    nan = np.isnan(wide)
    np.testing.assert_array_equal(np.isnan(out), nan)
    with np.errstate(over="ignore"):  # a float32 past float16's range rounds to inf
        rounded = wide.astype(dtype)
    np.testing.assert_array_equal(bits(out)[~nan], bits(rounded)[~nan])


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
@pytest.mark.parametrize("dv", [8, 13, 16, 40, 80])
@pytest.mark.parametrize(
    "magnitude", [1.0, 2e4, 3e-6], ids=["unit", "near-float16-max", "float16-subnormal"]
)
@pytest.mark.parametrize("lq", [1, 70], ids=["decode", "prefill"])
def test_equals_the_float32_result_rounded(native, rng, dtype, dv, magnitude, lq):
    if dtype == BF16 and lq > 1 and cpuattn.info()["isa"] in ("avx512_bf16", "avx512_amx"):
        # The bfloat16 pair steps round the weights to bfloat16 for a bfloat16 out and split
        # them in two for a float32 one (split_p, kernels/bf16_step.inl): not the same sums.
        pytest.skip("the bfloat16 pair steps compute a bfloat16 out differently")
    q = rng.standard_normal((2, 4, lq, 24)).astype(dtype)
    k = rng.standard_normal((2, 2, 300, 24)).astype(dtype)
    v = np.clip(rng.standard_normal((2, 2, 300, dv)) * magnitude, -65504, 65504).astype(dtype)
    v[1, 0, 7, 3] = np.nan  # every row of batch 1's heads 0-1 keeps key 7: NaN there
    kw = {"causal": True}
    out = native(q, k, v, **kw)
    wide = native(q, k, v, out_dtype=np.float32, **kw)
    out_lse, lse = native(q, k, v, return_lse=True, **kw)
    np.testing.assert_array_equal(bits(out_lse), bits(out))
    wide_lse = native(q, k, v, return_lse=True, out_dtype=np.float32, **kw)[1]
    np.testing.assert_array_equal(lse, wide_lse)
    assert out.dtype == dtype
    assert np.isnan(wide).any()
    assert_rounded(out, wide, dtype)
    if magnitude == 3e-6 and dtype == F16:  # subnormals reached
        assert (np.abs(out[~np.isnan(out)]) < np.finfo(F16).smallest_normal).any()


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_split_kv_decode(native, rng, dtype):
    """One query a head over 3000 keys: the keys are split among threads and the parts
    merged, which writes the rows (OutputWriter::merge)."""
    q = rng.standard_normal((1, 2, 1, 32)).astype(dtype)
    k = rng.standard_normal((1, 2, 3000, 32)).astype(dtype)
    v = rng.standard_normal((1, 2, 3000, 40)).astype(dtype)
    out = native(q, k, v, num_threads=2)
    assert_rounded(out, native(q, k, v, num_threads=2, out_dtype=np.float32), dtype)


def test_float16_results_past_its_range(native, rng):
    """An int8 cache's scales can make a float16 q's result exceed 65504: inf, as rounding
    the float32 result gives."""
    q = rng.standard_normal((1, 2, 5, 32)).astype(F16)
    k8, k_scale = cpuattn.quantize_int8(rng.standard_normal((1, 2, 70, 32)))
    v = rng.standard_normal((1, 2, 70, 24)) * 100
    v[..., :8] = 1e5  # every row's average past 65504 in these columns
    v8, v_scale = cpuattn.quantize_int8(v)
    kw = {"k_scale": k_scale, "v_scale": v_scale}
    out = native(q, k8, v8, **kw)
    wide = native(q, k8, v8, out_dtype=np.float32, **kw)
    assert np.isinf(out).any()
    assert_rounded(out, wide, F16)
