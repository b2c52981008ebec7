"""D = 0 on every dtype and every ISA: every score is 0, so each row's output is the mean of
v over the keys it keeps and its lse is log(number of kept keys); a row that keeps none gives
0 and -inf. The bfloat16 pair kernels once returned before writing their scores here, and
each row weighted whatever the score buffer held from the last call (issue #17)."""

import numpy as np
import pytest

from cpuattn._request import BF16

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

DTYPES = {  # id: (q dtype, K/V dtype)
    "f32": (F32, F32),
    "f64": (F64, F64),
    "f16": (F16, F16),
    "bf16": (BF16, BF16),
    "f32-over-f16": (F32, F16),
    "f32-over-bf16": (F32, BF16),
}
# Relative tolerance of each output type (q's): its rounding, a few units.
RTOL = {F32: 1e-5, F64: 1e-12, F16: 2e-3, BF16: 1.6e-2}

CASES = {  # id: (batch, hq, hkv, lq, lk, dv)
    "prefill": ((1,), 2, 2, 40, 130, 8),
    "prefill-dv16-gqa": ((2,), 4, 2, 70, 130, 16),  # Dv % 16 == 0: the AMX step
    "decode-gqa": ((2,), 8, 2, 1, 130, 16),  # few rows: K and V read in place
    "decode-split-kv": ((1,), 2, 1, 1, 1100, 24),  # split into key chunks, merged
}

VARIANTS = {  # id: (causal, kv_lengths as a function of (batch, lk))
    "plain": (False, None),
    "causal": (True, None),
    "kv-lengths": (False, lambda batch, lk: np.arange(np.prod(batch)).reshape(batch) * 7 % lk),
    "causal-kv-lengths": (True, lambda batch, lk: np.full(batch, min(lk, 25))),
}


def expected(v, lq, hq, causal, kv_lengths):
    """out and lse from the kept keys alone, in float64."""
    v = np.asarray(v, np.float64)
    batch, (hkv, lk) = v.shape[:-3], v.shape[-3:-1]
    v = np.repeat(v, hq // hkv, axis=-3)
    n_keys = np.broadcast_to(lk if kv_lengths is None else kv_lengths, batch)
    n_keys = n_keys.reshape(*batch, 1, 1, 1)
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    keep = j < n_keys
    if causal:
        keep = keep & (j <= i + n_keys - lq)
    keep = np.broadcast_to(keep, (*batch, hq, lq, lk))
    count = keep.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(count[..., None] > 0, (keep @ v) / count[..., None], 0.0)
        lse = np.log(count)
    return out, lse


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtypes", DTYPES)
def test_empty_head_dim_gives_the_mean_of_kept_values(native, rng, dtypes, case, variant):
    q_dtype, kv_dtype = DTYPES[dtypes]
    batch, hq, hkv, lq, lk, dv = CASES[case]
    causal, lengths = VARIANTS[variant]
    kv_lengths = None if lengths is None else lengths(batch, lk)
    q = np.empty((*batch, hq, lq, 0), q_dtype)
    k = np.empty((*batch, hkv, lk, 0), kv_dtype)
    v = rng.standard_normal((*batch, hkv, lk, dv)).astype(kv_dtype)
    want_out, want_lse = expected(v, lq, hq, causal, kv_lengths)
    # Twice: the second call must not see what the first left in the kernels' scratch.
    for _ in range(2):
        out, lse = native(q, k, v, causal=causal, kv_lengths=kv_lengths, return_lse=True)
        assert out.dtype == q_dtype
        assert out.shape == want_out.shape
        err = np.abs(out.astype(np.float64) - want_out) / np.maximum(np.abs(want_out), 1)
        assert err.max() <= RTOL[q_dtype], f"max error {err.max():.3g}"
        assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
        finite = np.isfinite(want_lse)
        np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-6, atol=1e-6)
