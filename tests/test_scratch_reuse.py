"""The native backend hands a calling thread's scratch blocks back to its next call
(csrc/scratch_memory.cpp): a call after one on poisoned inputs (NaN, inf, huge values) of the
same shapes, whose blocks it then reuses, gives the bits a call on fresh memory gave."""

import numpy as np
import pytest

import cpuattn
from cpuattn._request import BF16

pytestmark = pytest.mark.skipif(not cpuattn.info()["native"], reason="native backend not built")

CASES = [  # (b, hq, hkv, lq, lk, d, dv, options)
    (1, 4, 2, 1, 37, 8, 8, {}),  # decode, GQA
    (2, 2, 1, 9, 17, 16, 16, {"causal": True}),
    (1, 3, 3, 18, 40, 16, 32, {"window": (5, 3)}),  # narrow tiles: 8 + 6 + 4 rows
    (1, 2, 2, 33, 70, 64, 64, {"softcap": 3.0, "return_lse": True}),
    (2, 4, 4, 1, 513, 128, 128, {}),  # split-KV decode
]


def run(arrays, options, threads):
    return cpuattn.attention(*arrays, num_threads=threads, backend="native", **options)


def as_bits(result):
    parts = result if isinstance(result, tuple) else (result,)
    return [np.asarray(p).view(np.uint8).copy() for p in parts]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_calls_after_poisoned_ones_give_the_same_bits(rng, dtype, case):
    b, hq, hkv, lq, lk, d, dv, options = case
    arrays = [
        rng.standard_normal(shape).astype(dtype)
        for shape in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv))
    ]
    fresh = {t: as_bits(run(arrays, options, t)) for t in (1, 2)}
    for poison in (np.nan, np.inf, -np.inf, 1e30):
        with np.errstate(all="ignore"):
            poisoned = [np.full_like(a, poison) for a in arrays]
            for t in (1, 2):
                run(poisoned, options, t)
        for t in (1, 2):
            for got, want in zip(as_bits(run(arrays, options, t)), fresh[t], strict=True):
                np.testing.assert_array_equal(got, want)
