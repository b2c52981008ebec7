"""benchmarks/run.py picks its special cases by what they are, not by list position: two rows
added to the full list once made its decode-bandwidth line time a causal prefill (0.1 GB/s)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import cpuattn
from cpuattn import _bench

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def run():
    if not RUN.exists():  # an sdist or wheel test run without the benchmarks folder
        pytest.skip("benchmarks/run.py is not here")
    spec = importlib.util.spec_from_file_location("benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(RUN.parent))  # run.py imports its neighbours, as a script does
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(RUN.parent))
    return module


def test_decode_bandwidth_case_is_a_decode(run):
    case = run.DECODE_CASE
    assert case.lq == 1
    assert case.lk >= 4096


def test_quick_list_names_its_cases(run):
    assert [c.name for c in run.QUICK] == ["L=1024", "MiniLM batch", "causal L=4096", "decode GQA"]


@pytest.mark.parametrize(
    "case",
    [
        _bench.Case("padded", 3, 4, 2, 9, 9, 8, padding=(9, 1, 5)),
        _bench.Case("padded, causal", 3, 4, 4, 9, 9, 8, causal=True, padding=(9, 3, 5)),
        _bench.Case("padded, window", 2, 2, 2, 6, 11, 8, window=(3, 0), causal=True,
                    padding=(11, 8)),
        _bench.Case("causal, Lq < Lk", 1, 2, 2, 5, 12, 8, causal=True),
    ],
    ids=lambda c: c.name,
)  # fmt: skip
def test_baselines_compute_the_timed_call(case):
    """The benchmark times each baseline on the same problem as cpuattn: the same masks,
    padding, causal alignment and window, so their outputs agree."""
    q, k, v = case.inputs()
    ours = cpuattn.attention(q, k, v, **case.kwargs())
    runners = {
        "numpy naive": lambda: _bench.naive_numpy(q, k, v, case.causal, case.window, case.mask()),
        "torch sdpa": _bench.torch_sdpa_runner(q, k, v, case.causal, case.window, case.mask()),
        "onnxruntime": _bench.onnxruntime_runner(q, k, v, case.causal, case.window, case.mask()),
    }
    for name, run in runners.items():
        if run is None:  # not installed
            continue
        out = run()
        out = out[0] if isinstance(out, list) else out
        np.testing.assert_allclose(np.asarray(out), ours, atol=2e-6, err_msg=name)
