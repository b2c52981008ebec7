"""The backward rows of benchmarks/run.py: cpuattn.attention_backward against torch's CPU
flash-attention backward on the same inputs, in one process (issue #19's targets).

GF/s count 2.5x the forward's flops (five matrix products instead of two). Each row also
gives the backward's time over cpuattn's own forward on the same shape, and the rows end with
the backward's thread scaling.
"""

from __future__ import annotations

import numpy as np

import cpuattn
from cpuattn import _bench, info

Case = _bench.Case
CASES = [
    Case("backward (1, 8, 4096, 64)", 1, 8, 8, 4096, 4096, 64),
    Case("backward causal (1, 8, 4096, 64)", 1, 8, 8, 4096, 4096, 64, causal=True),
    Case("backward one head (1, 1, 8192, 64)", 1, 1, 1, 8192, 8192, 64),
    Case("backward MiniLM (32, 12, 128, 32)", 32, 12, 12, 128, 128, 32),
]
SCALING_CASE = CASES[0]


def run_case(case: Case, repeats: int, peak: float) -> dict:
    q, k, v = case.inputs()
    out, lse = cpuattn.attention(q, k, v, causal=case.causal, return_lse=True)
    dout = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32)
    ours = cpuattn.attention_backward(dout, q, k, v, out, lse, causal=case.causal)
    runners = {
        "cpuattn": lambda: cpuattn.attention_backward(dout, q, k, v, out, lse, causal=case.causal),
        "cpuattn forward": lambda: cpuattn.attention(q, k, v, causal=case.causal, return_lse=True),
    }
    row = {"case": case.name, "gflop": 2.5 * case.flops() / 1e9}
    torch_run = _bench.torch_flash_backward_runner(dout, q, k, v, out, lse, case.causal)
    if torch_run is not None:
        runners["torch flash backward"] = torch_run
        theirs = [g.numpy() for g in torch_run()]  # the same gradients, to float32 rounding
        row["max_rel_diff_torch"] = max(
            float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, theirs, strict=True)
        )
    row["ms"] = {name: 1e3 * t for name, t in _bench.interleaved_medians(runners, repeats).items()}
    ms = row["ms"]["cpuattn"]
    row["gflops"] = row["gflop"] / ms * 1e3
    row["pct_sgemm"] = 100 * row["gflops"] / peak
    row["vs_forward"] = ms / row["ms"]["cpuattn forward"]
    if "torch flash backward" in row["ms"]:
        row["x_torch"] = row["ms"]["torch flash backward"] / ms
    return row


def scaling(repeats: int) -> dict:
    q, k, v = SCALING_CASE.inputs()
    out, lse = cpuattn.attention(q, k, v, return_lse=True)
    threads = info()["max_threads"]
    t = _bench.interleaved_medians(
        {
            n: lambda n=n: cpuattn.attention_backward(out, q, k, v, out, lse, num_threads=n)
            for n in (1, threads)
        },
        repeats,
    )
    return {"case": SCALING_CASE.name, "threads": threads, "speedup": t[1] / t[threads]}


def rows(repeats: int, peak: float) -> dict:
    return {
        "rows": [run_case(case, repeats, peak) for case in CASES],
        "scaling": scaling(repeats),
    }


def markdown(result: dict, peak: float) -> str:
    lines = [
        "",
        f"Backward, float32 (GF/s: 2.5x the forward's flops; sgemm {peak:.0f} GF/s):",
        "",
        (
            "| case | cpuattn ms | GF/s | % sgemm | x own forward | x torch flash backward "
            "| max rel diff vs torch |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        torch_cells = (
            f"{r['x_torch']:.2f} | {r['max_rel_diff_torch']:.1e}" if "x_torch" in r else "- | -"
        )
        lines.append(
            f"| {r['case']} | {r['ms']['cpuattn']:.1f} | {r['gflops']:.1f} | "
            f"{r['pct_sgemm']:.0f}% | {r['vs_forward']:.2f} | {torch_cells} |"
        )
    s = result["scaling"]
    lines.append(
        f"\n- backward threads: {s['case']}, {s['threads']} threads {s['speedup']:.2f}x 1 thread"
    )
    return "\n".join(lines)
