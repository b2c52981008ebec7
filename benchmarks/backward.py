"""The backward rows of benchmarks/run.py: cpuattn.attention_backward against torch's CPU
flash-attention backward on the same inputs, in one process (issue #19's targets), in float32
and in bfloat16 (issue #22: with AMX or AVX512-BF16 cpuattn multiplies bfloat16 pairs).

GF/s count 2.5x the forward's flops (five matrix products instead of two). Each row also
gives the backward's time over cpuattn's own forward on the same shape, and the rows end with
the backward's thread scaling. The bfloat16 rows also give both libraries' error against the
float64 gradients of the same bfloat16 inputs (root mean square over each gradient, relative
to its own, the worst of dq, dk, dv; on the first head, to keep the float64 reference short).
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
BF16_CASES = [
    Case(f"bf16 backward {name}", *shape, **kw, q_dtype="bfloat16", kv_dtype="bfloat16")
    for name, shape, kw in (
        ("(1, 8, 4096, 64)", (1, 8, 8, 4096, 4096, 64), {}),
        ("(1, 16, 2048, 128)", (1, 16, 16, 2048, 2048, 128), {}),
        ("causal (1, 8, 4096, 64)", (1, 8, 8, 4096, 4096, 64), {"causal": True}),
        ("MiniLM (32, 12, 128, 32)", (32, 12, 12, 128, 128, 32), {}),
    )
]
SCALING_CASE = CASES[0]


def run_case(case: Case, repeats: int, peak: float) -> dict:
    q, k, v = case.inputs()
    out, lse = cpuattn.attention(q, k, v, causal=case.causal, return_lse=True)
    dout = np.random.default_rng(1).standard_normal(out.shape, dtype=np.float32).astype(out.dtype)
    ours = cpuattn.attention_backward(dout, q, k, v, out, lse, causal=case.causal)
    runners = {
        "cpuattn": lambda: cpuattn.attention_backward(dout, q, k, v, out, lse, causal=case.causal),
        "cpuattn forward": lambda: cpuattn.attention(q, k, v, causal=case.causal, return_lse=True),
    }
    row = {"case": case.name, "gflop": 2.5 * case.flops() / 1e9}
    torch_run = _bench.torch_flash_backward_runner(dout, q, k, v, out, lse, case.causal)
    if torch_run is not None:
        runners["torch flash backward"] = torch_run
        theirs = [g.float().numpy() for g in torch_run()]  # the same gradients, to rounding
        row["max_rel_diff_torch"] = max(
            float(np.abs(a.astype(np.float32) - b).max() / np.abs(b).max())
            for a, b in zip(ours, theirs, strict=True)
        )
        if case.q_dtype == "bfloat16":
            row["rms_error"] = first_head_errors(case, (dout, q, k, v, out, lse), ours, theirs)
    row["ms"] = {name: 1e3 * t for name, t in _bench.interleaved_medians(runners, repeats).items()}
    ms = row["ms"]["cpuattn"]
    row["gflops"] = row["gflop"] / ms * 1e3
    row["pct_sgemm"] = 100 * row["gflops"] / peak
    row["vs_forward"] = ms / row["ms"]["cpuattn forward"]
    if "torch flash backward" in row["ms"]:
        row["x_torch"] = row["ms"]["torch flash backward"] / ms
    return row


def first_head_errors(case: Case, inputs, *results) -> list[float]:
    """Each result's error against the float64 gradients of the same inputs, on the first
    head: the root mean square of each gradient's error over its own, the worst of the three."""
    first = [x[:, :1] for x in inputs]
    wide = [x.astype(np.float64) for x in first]
    exact = cpuattn.attention_backward(*wide, causal=case.causal, backend="numpy")

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x))))

    return [
        max(
            rms(g[:, :1].astype(np.float64) - e) / rms(e) for g, e in zip(grads, exact, strict=True)
        )
        for grads in results
    ]


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
        "bf16_rows": [run_case(case, repeats, peak) for case in BF16_CASES],
        "isa": info()["isa"],
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
    lines += [
        "",
        f"Backward, bfloat16 (isa {result['isa']}; error: RMS against float64, first head):",
        "",
        "| case | cpuattn ms | GF/s | x torch bf16 flash backward | error cpuattn | error torch |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["bf16_rows"]:
        torch_cells = "- | - | -"
        if "x_torch" in r:
            ours, theirs = r["rms_error"]
            torch_cells = f"{r['x_torch']:.2f} | {ours:.2e} | {theirs:.2e}"
        lines.append(
            f"| {r['case']} | {r['ms']['cpuattn']:.1f} | {r['gflops']:.1f} | {torch_cells} |"
        )
    s = result["scaling"]
    lines.append(
        f"\n- backward threads: {s['case']}, {s['threads']} threads {s['speedup']:.2f}x 1 thread"
    )
    return "\n".join(lines)
