"""``python -m cpuattn``: what this installation runs, then a quick side-by-side benchmark.

For the full benchmark suite (more shapes, JSON, plot) run ``python benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import functools
from typing import cast

import numpy as np

from . import _bench
from ._api import attention, info

DEMO_CASES = [
    _bench.Case("prefill", 1, 8, 8, 1024, 1024, 64),
    _bench.Case("prefill causal", 1, 8, 8, 1024, 1024, 64, causal=True),
    _bench.Case("MiniLM batch", 32, 12, 12, 128, 128, 32),
    _bench.Case("GQA prefill", 1, 32, 8, 512, 512, 128, causal=True),
    _bench.Case("decode GQA", 1, 32, 8, 1, 4096, 128),
]


# Plain text for --help (the module docstring is reStructuredText).
DESCRIPTION = (
    "Show what this cpuattn installation runs (version, native kernel, ISA, OpenMP, threads), "
    "then time a few attention shapes against naive NumPy and, if installed, torch SDPA."
)
EPILOG = (
    "For the full benchmark suite (more shapes, onnxruntime, JSON, plot), run "
    "python benchmarks/run.py from a source checkout."
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cpuattn", description=DESCRIPTION, epilog=EPILOG
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    args = parser.parse_args(argv)

    facts = info()
    print(
        f"cpuattn {facts['version']}: native={facts['native']} isa={facts['isa']} "
        f"openmp={facts['openmp']} threads={facts['max_threads']}"
    )
    if not facts["native"]:
        print(f"  native backend unavailable ({facts['native_error']}); timing the NumPy one")
    print(f"numpy float32 matmul 2048^2: {_bench.sgemm_gflops():.0f} GF/s\n")

    header = (
        "| case | q / kv shape | cpuattn ms | GF/s | numpy naive ms | torch ms "
        "| x numpy | x torch | max rel err |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for case in DEMO_CASES:
        q, k, v = case.inputs()
        kw = case.kwargs()
        out = cast(np.ndarray, attention(q, k, v, **kw))  # no return_lse / return_weights
        runners = {
            "ours": functools.partial(attention, q, k, v, **kw),
            "naive": functools.partial(_bench.naive_numpy, q, k, v, case.causal, case.window),
        }
        torch_run = _bench.torch_sdpa_runner(q, k, v, case.causal, case.window)
        if torch_run:
            runners["torch"] = torch_run
        t = _bench.interleaved_medians(runners, args.repeats)
        ours, naive, torch_t = t["ours"], t["naive"], t.get("torch")
        err = _bench.max_error_vs_float64(case, out)
        shapes = f"{tuple(q.shape)} / {tuple(k.shape)}"
        torch_ms = f"{torch_t * 1e3:.2f}" if torch_t else "–"
        torch_x = f"{torch_t / ours:.2f}" if torch_t else "–"
        print(
            f"| {case.name} | {shapes} | {ours * 1e3:.2f} | {case.flops() / ours / 1e9:.1f} "
            f"| {naive * 1e3:.2f} | {torch_ms} | {naive / ours:.2f} | {torch_x} | {err:.1e} |"
        )
    print(f"\n{_bench.MAX_REL_ERR}")
    if _bench.not_installed("torch"):
        print("torch not installed: its columns show –; pip install torch to compare")


if __name__ == "__main__":
    main()
