"""benchmarks/run.py picks its special cases by what they are, not by list position: two rows
added to the full list once made its decode-bandwidth line time a causal prefill (0.1 GB/s)."""

import importlib.util
import sys
from pathlib import Path

import pytest

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
