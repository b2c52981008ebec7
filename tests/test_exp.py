"""The kernels' vectorized exp against np.exp over its whole input range, per ISA.

Stated accuracy (csrc/exp.h): relative error <= 1.5 ulp for float32 (measured 1.3) and
<= 1 ulp for float64 (measured 0.8); results below the smallest normal number flush to 0
(x < log(tiny), rounded to the dtype), past the largest finite one they are inf.
"""

import numpy as np
import pytest

from cpuattn import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason="native backend not built")
ISAS = list(_native._core.supported_isas()) if _native.available() else []
MAX_ULP = {np.float32: 1.5, np.float64: 1.0}


def inputs(dtype):
    fi = np.finfo(dtype)
    lo, hi = float(np.log(fi.tiny)), float(np.log(fi.max))
    return np.concatenate(
        [
            np.linspace(2 * lo, 2 * hi, 1_000_003),  # the whole range, past both ends
            np.linspace(-1, 1, 200_001),  # around 0, where exp is near 1
            np.linspace(lo - 1, lo + 1, 100_001),  # the flush threshold
            np.linspace(hi - 1, hi + 1, 100_001),  # overflow
            [0.0, -0.0, lo, hi, -np.inf, np.inf, np.nan, -1e30, 1e30, fi.tiny, -fi.tiny],
        ]
    ).astype(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_matches_numpy(isa, dtype):
    x = inputs(dtype)
    got = _native._core.kernel_exp(x, isa)
    assert got.dtype == dtype
    assert got.shape == x.shape
    wide = np.longdouble if dtype == np.float64 else np.float64
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(wide))
    flushed = x < dtype(np.log(np.finfo(dtype).tiny))
    assert np.all(got[flushed] == 0)  # -inf and very negative included
    assert np.all(np.isnan(got[np.isnan(x)]))
    overflow = ~flushed & (exact > np.finfo(dtype).max)
    assert np.all(got[overflow] == np.inf)
    normal = ~flushed & ~overflow & ~np.isnan(x)
    rel = np.abs((got[normal] - exact[normal]) / exact[normal]).astype(np.float64)
    worst = float(rel.max()) / np.finfo(dtype).eps
    assert worst <= MAX_ULP[dtype], f"max error {worst:.2f} ulp at x = {x[normal][rel.argmax()]}"
    assert np.all(got[x == 0] == 1.0)
