"""Sizes past 32-bit indices run right in O(tile) memory; sizes past memory raise MemoryError."""

import os

import numpy as np
import pytest

import cpuattn
from cpuattn import _bench

L, D, WINDOW = 50_000, 8, 63  # one head: Lq * Lk = 2.5e9 > 2**31


def big_inputs():
    rng = np.random.default_rng(7)
    return tuple(rng.standard_normal((1, L, D)).astype(np.float32) for _ in range(3))


def banded_reference(q, k, v, rows):
    """Rows of causal sliding-window attention, in float64, straight from the definition."""
    out = []
    for i in rows:
        lo = max(0, i - WINDOW)
        s = (k[0, lo : i + 1].astype(np.float64) @ q[0, i].astype(np.float64)) / np.sqrt(D)
        p = np.exp(s - s.max())
        out.append(p @ v[0, lo : i + 1] / p.sum())
    return np.array(out)


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_window_over_50k_by_50k_scores(backend):
    if backend == "native" and not cpuattn.info()["native"]:
        pytest.skip("native backend not built")
    q, k, v = big_inputs()
    out = cpuattn.attention(q, k, v, causal=True, window=(WINDOW, 0), backend=backend)
    rows = [0, 1, WINDOW, 2**15 + 3, 46_341, L - 1]  # 46 341^2 > 2**31
    np.testing.assert_allclose(out[0, rows], banded_reference(q, k, v, rows), atol=2e-5)


@pytest.mark.skipif(
    not cpuattn.info()["native"] or not os.path.exists("/proc/self/clear_refs"),
    reason="native backend and Linux /proc needed",
)
def test_native_peak_memory_is_independent_of_length():
    """In a fresh process: the call's peak RSS beyond its inputs and output is O(tile)."""
    case = _bench.Case("big", 1, 1, 1, L, L, D, causal=True, window=(WINDOW, 0))
    extra_mib = _bench.peak_extra_mib(case)
    assert extra_mib is not None
    assert extra_mib < 16, f"peak grew {extra_mib:.1f} MiB (L^2 floats would be 9 GiB)"


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_output_too_big_for_memory_raises_memory_error(backend):
    if backend == "native" and not cpuattn.info()["native"]:
        pytest.skip("native backend not built")
    q = np.broadcast_to(np.zeros((1, 1, 1, 8), np.float32), (1, 1, 2**40, 8))  # no memory
    k = v = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(MemoryError):
        cpuattn.attention(q, k, v, backend=backend)


@pytest.mark.skipif(not cpuattn.info()["native"], reason="native backend not built")
def test_operand_copy_too_big_for_memory_raises_memory_error():
    # A zero stride on the last axis needs a contiguous copy for the kernel: 32 TiB here.
    q = np.zeros((1, 1, 1, 8), np.float32)
    k = v = np.broadcast_to(np.zeros(1, np.float32), (1, 1, 2**40, 8))
    with pytest.raises(MemoryError):
        cpuattn.attention(q, k, v, backend="native")
