"""Side-by-side attention benchmark: cpuattn vs numpy-BLAS naive, torch SDPA and onnxruntime,
in one process.

    python benchmarks/run.py                 # the full shape list, markdown table on stdout
    python benchmarks/run.py --quick         # a few shapes
    python benchmarks/run.py --json out.json --plot out.png

A first line names what was measured on what: the version, the ISA in use (and the CPU's),
the threads, the CPU model and the date (in --json too). Reports ms (median), GF/s over kept
(query, key) pairs, % of the measured sgemm peak, and the speed ratio against each baseline
(torch and onnxruntime rows appear when they are installed).
Each cpuattn result is checked against the float64 NumPy backend before it is timed. After the
table: thread scaling, decode K/V bandwidth against the measured read bandwidth, peak extra
memory of one call in a fresh process, (with dask installed) the distributed row of
benchmarks/dask_cluster.py, the backward against torch's (benchmarks/backward.py; alone
with --backward), transformers models with attn_implementation="cpuattn" against "sdpa"
(benchmarks/models.py; alone with --models), and decode over int8 and paged caches
(benchmarks/serving.py; alone with --serving), and hybrid attention, a window with global
tokens (benchmarks/hybrid.py; alone with --hybrid).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import backward  # benchmarks/backward.py, dask_cluster.py and models.py, next to this script
import dask_cluster
import hybrid
import models
import numpy as np
import serving

import cpuattn
from cpuattn import _bench, attention, info

Case = _bench.Case
# Sentence lengths of the padded batch: 16-128 tokens, one of them the full 128.
PADDED_LENGTHS = (128, *(int(n) for n in np.random.default_rng(7).integers(16, 129, 31)))

FULL = [
    *(Case(f"L={n}", 1, 8, 8, n, n, 64) for n in (512, 1024, 2048, 4096, 8192)),
    Case("D=128", 1, 16, 16, 2048, 2048, 128),
    # Large heads (issue #17 item 12): the phased tile step.
    Case("D=1024 L=512, one head", 1, 1, 1, 512, 512, 1024),
    Case("D=4096 L=512, one head", 1, 1, 1, 512, 512, 4096),
    Case("batch 4", 4, 8, 8, 512, 512, 64),
    Case("MiniLM batch", 32, 12, 12, 128, 128, 32),
    # Sentence-sized heads (32 tokens): per-head fixed costs weigh as much as the products.
    Case("MiniLM short batch", 32, 12, 12, 32, 32, 32),
    # A padded batch as transformers runs it: sentences of 16-128 tokens padded to 128, the
    # padding dropped by a (32, 1, 1, 128) bool mask every implementation is given.
    Case("MiniLM padded batch", 32, 12, 12, 128, 128, 32, padding=PADDED_LENGTHS),
    Case("GQA 32/8", 1, 32, 8, 2048, 2048, 128),
    Case("causal L=4096", 1, 8, 8, 4096, 4096, 64, causal=True),
    Case("causal L=8192", 1, 8, 8, 8192, 8192, 64, causal=True),
    Case("window 512 L=8192", 1, 8, 8, 8192, 8192, 64, causal=True, window=(511, 0)),
    Case("decode GQA", 1, 32, 8, 1, 16384, 128),
    Case("decode Lq=4 causal", 1, 32, 8, 4, 16384, 128, causal=True),
    Case("decode MQA", 1, 32, 1, 1, 16384, 128),
    Case("decode GQA 24/8", 1, 24, 8, 1, 16384, 128),  # 3 query heads a kv head (Llama 3.2 3B)
    # Variants: softcap and ALiBi, each timed against the same call without it, interleaved
    # (issue 7 target: <= 1.15x).
    Case("softcap 30 L=4096", 1, 8, 8, 4096, 4096, 64, options={"softcap": 30.0}),
    Case(
        "ALiBi L=4096",
        1,
        8,
        8,
        4096,
        4096,
        64,
        options={"alibi_slopes": tuple(2.0 ** -np.arange(1, 9))},
    ),
    # A padded cache: baselines have no per-batch lengths, so only cpuattn is timed.
    Case(
        "decode B=8 mixed lengths",
        8,
        32,
        8,
        1,
        4096,
        128,
        options={"kv_lengths": (512, 4096, 1024, 3000, 77, 4096, 2048, 100)},
    ),
    # Half precision (issue 5): compare with the float32 rows L=2048 and decode GQA above.
    Case("bf16 L=2048", 1, 8, 8, 2048, 2048, 64, q_dtype="bfloat16", kv_dtype="bfloat16"),
    Case("f16 L=2048", 1, 8, 8, 2048, 2048, 64, q_dtype="float16", kv_dtype="float16"),
    Case("bf16 decode GQA", 1, 32, 8, 1, 16384, 128, q_dtype="bfloat16", kv_dtype="bfloat16"),
    Case("f32 q, bf16 cache decode GQA", 1, 32, 8, 1, 16384, 128, kv_dtype="bfloat16"),
    Case("f16 decode GQA", 1, 32, 8, 1, 16384, 128, q_dtype="float16", kv_dtype="float16"),
]
HALF_VS_FLOAT32 = {
    "bf16 L=2048": "L=2048",
    "f16 L=2048": "L=2048",
    "bf16 decode GQA": "decode GQA",
    "f32 q, bf16 cache decode GQA": "decode GQA",
    "f16 decode GQA": "decode GQA",
}
QUICK = [c for c in FULL if c.name in ("L=1024", "MiniLM batch", "causal L=4096", "decode GQA")]
MAX_NAIVE_SCORES = 2**28  # skip the O(L^2) baseline past 1 GiB of float32 scores
SCORE_VARIANTS = ("softcap", "alibi_slopes")  # rows timed against the same call without them


def run_case(case: Case, repeats: int, peak: float) -> dict:
    q, k, v = case.inputs()
    kw = case.kwargs()
    err = _bench.max_error_vs_float64(case, attention(q, k, v, **kw))
    row = {
        "case": case.name,
        "q": list(q.shape),
        "kv": list(k.shape),
        "causal": case.causal,
        "window": case.window,
        "gflop": case.flops() / 1e9,
        "max_rel_err": err,
    }
    runners = {"cpuattn": lambda: attention(q, k, v, **kw)}
    if case.options:  # options the baselines lack (kv_lengths, softcap, ALiBi): cpuattn only
        if set(case.options) & set(SCORE_VARIANTS):  # and the same call without them
            runners["cpuattn plain"] = lambda: attention(
                q, k, v, causal=case.causal, window=case.window
            )
    else:
        half = case.kv_dtype != "float32"  # NumPy and this onnxruntime graph: float32 only
        if half:  # its float32 twin, timed in the same rounds so the ratio is robust
            q32, k32, v32 = dataclasses.replace(
                case, q_dtype="float32", kv_dtype="float32"
            ).inputs()
            runners["cpuattn float32"] = lambda: attention(q32, k32, v32, **kw)
        small = case.b * case.hq * case.lq * case.lk <= MAX_NAIVE_SCORES
        if not half and small:
            runners["numpy naive"] = lambda: _bench.naive_numpy(
                q, k, v, case.causal, case.window, case.mask()
            )
        torch_run = _bench.torch_sdpa_runner(q, k, v, case.causal, case.window, case.mask())
        if torch_run is not None:
            runners["torch sdpa"] = torch_run
        ort_run = (
            _bench.onnxruntime_runner(q, k, v, case.causal, case.window, case.mask())
            if not half and small
            else None
        )
        if ort_run is not None:
            runners["onnxruntime"] = ort_run
    row["ms"] = {name: 1e3 * t for name, t in _bench.interleaved_medians(runners, repeats).items()}
    return finish_row(row, case, peak)


def finish_row(row: dict, case: Case, peak: float) -> dict:
    ours = row["ms"]["cpuattn"]
    row["gflops"] = case.flops() / ours / 1e6
    row["pct_sgemm"] = 100 * row["gflops"] / peak
    row["speedup"] = {
        name: ms / ours for name, ms in row["ms"].items() if not name.startswith("cpuattn")
    }
    return row


def markdown(rows, peak: float) -> str:
    lines = [
        f"sgemm peak (numpy float32 2048^2): {peak:.0f} GF/s",
        "",
        (
            "| case | q | kv | cpuattn ms | GF/s | % sgemm | numpy naive ms | torch ms "
            "| onnxruntime ms | x numpy | x torch | x onnxruntime | max rel err |"
        ),
        "|---" * 13 + "|",
    ]

    def cell(d, key, fmt):
        return format(d[key], fmt) if key in d else "–"

    for r in rows:
        ms, x = r["ms"], r["speedup"]
        lines.append(
            f"| {r['case']} | {tuple(r['q'])} | {tuple(r['kv'])} | {ms['cpuattn']:.2f} "
            f"| {r['gflops']:.1f} | {r['pct_sgemm']:.0f}% | {cell(ms, 'numpy naive', '.2f')} "
            f"| {cell(ms, 'torch sdpa', '.2f')} | {cell(ms, 'onnxruntime', '.2f')} "
            f"| {cell(x, 'numpy naive', '.2f')} | {cell(x, 'torch sdpa', '.2f')} "
            f"| {cell(x, 'onnxruntime', '.2f')} | {r['max_rel_err']:.1e} |"
        )
    lines += ["", _bench.MAX_REL_ERR]
    missing = _bench.not_installed("torch", "onnx", "onnxruntime")
    installed = {"numpy naive"} | {
        name
        for name, modules in (("torch sdpa", ["torch"]), ("onnxruntime", ["onnx", "onnxruntime"]))
        if not set(modules) & set(missing)
    }
    if any(installed - set(r["ms"]) for r in rows):
        lines.append(
            "–: not timed (the baseline lacks the row's option or dtype, or its Lq x Lk "
            "scores would pass 1 GiB)"
        )
    if "torch" in missing:
        lines.append("torch not installed: its columns show –; pip install torch to compare")
    if {"onnx", "onnxruntime"} & set(missing):
        lines.append(
            "onnx/onnxruntime not installed: their columns show –; "
            'pip install "cpuattn[bench]" to compare'
        )
    return "\n".join(lines)


def plot(rows, path: str, peak: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = [r for r in rows if r["case"].startswith("L=")]
    if not seq:
        return
    lengths = [r["q"][2] for r in seq]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in ("cpuattn", "numpy naive", "torch sdpa", "onnxruntime"):
        points = [
            (n, r["gflop"] / r["ms"][impl] * 1e3)
            for n, r in zip(lengths, seq, strict=True)
            if impl in r["ms"]
        ]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=impl)
    ax.axhline(
        peak,
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"numpy sgemm 2048² ({peak:.0f} GF/s)",
    )
    ax.set_ylim(bottom=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L  (q, k, v = (1, 8, L, 64), float32)")
    ax.set_ylabel("GF/s")
    ax.set_title("Attention throughput, this machine")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SCALING_CASE = Case("L=4096", 1, 8, 8, 4096, 4096, 64)
DECODE_CASE = next(c for c in FULL if c.name == "decode GQA")
MEMORY_CASE = Case("L=32768", 1, 8, 8, 32768, 32768, 64)
HALF_DECODE_CASES = [
    c
    for c in FULL
    if c.name in ("f16 decode GQA", "bf16 decode GQA", "f32 q, bf16 cache decode GQA")
]


def extras(repeats: int, quick: bool) -> dict:
    """Thread scaling, decode bandwidth, peak memory: the numbers the table cannot show."""
    out = {}
    q, k, v = SCALING_CASE.inputs()
    threads = info()["max_threads"]
    t = _bench.interleaved_medians(
        {
            1: lambda: attention(q, k, v, num_threads=1),
            threads: lambda: attention(q, k, v, num_threads=threads),
        },
        repeats,
    )
    one, many = t[1], t[threads]
    out["scaling"] = {
        "case": SCALING_CASE.name,
        "threads": threads,
        "ms_1": 1e3 * one,
        "ms_n": 1e3 * many,
        "speedup": one / many,
    }
    # Decode is bound by reading K/V: compare it with the read bandwidth of all threads, both
    # over more bytes than the caches hold (one cache per layer visited in turn, as in a model).
    seconds, layers = _bench.cold_decode_seconds(DECODE_CASE, repeats)
    out["decode"] = {
        "case": DECODE_CASE.name,
        "layers": layers,
        "ms": 1e3 * seconds,
        "kv_gbs": DECODE_CASE.kv_bytes() / seconds / 1e9,
        "read_gbs": _bench.read_gbs(threads),
        "threads": threads,
        "l3_mib": _bench.l3_bytes() / 2**20,
        "sweep_gib": _bench.beyond_caches_bytes() / 2**30,
    }
    out["half_decode"] = half_decode_vs_float32(repeats)
    if not quick:
        out["memory"] = {
            impl: _bench.peak_extra_mib(MEMORY_CASE, impl) for impl in ("cpuattn", "torch sdpa")
        }
        out["varlen"] = varlen_vs_padded(repeats)
        out["additive"] = additive_vs_numpy(repeats)
        distributed = dask_cluster.dask_vs_local(repeats)
        if distributed is not None:
            out["dask"] = distributed
    return out


def half_decode_vs_float32(repeats: int) -> dict:
    """Cold decode over float16 and bfloat16 caches against the float32 cache: half the bytes
    should show as nearly half the time. Rounds of one run per case, and the ratio to float32
    within each round (this machine kind's timings move 10-20 % from run to run)."""
    cases = [DECODE_CASE, *HALF_DECODE_CASES]
    seconds: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(max(3, repeats // 3)):
        for c in cases:
            seconds[c.name].append(_bench.cold_decode_seconds(c, 3)[0])
    f32 = np.array(seconds[DECODE_CASE.name])
    return {
        c.name: {
            "ms": 1e3 * float(np.median(seconds[c.name])),
            "kv_gbs": c.kv_bytes() / float(np.median(seconds[c.name])) / 1e9,
            "vs_f32": float(np.median(f32 / np.array(seconds[c.name]))),
        }
        for c in HALF_DECODE_CASES
    }


def additive_vs_numpy(repeats: int) -> dict:
    """Bahdanau attention at (1, 8, 512, 32): cpuattn vs NumPy broadcasting the score cube."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 512, 32), dtype=np.float32) for _ in range(3))
    w = rng.standard_normal(32).astype(np.float32)

    def numpy_broadcast():
        s = (w * np.tanh(q[..., :, None, :] + k[..., None, :, :])).sum(-1)
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v

    t = _bench.interleaved_medians(
        {"ours": lambda: cpuattn.additive_attention(q, k, v, w), "numpy": numpy_broadcast}, repeats
    )
    return {"ms": 1e3 * t["ours"], "ms_numpy": 1e3 * t["numpy"]}


def varlen_vs_padded(repeats: int) -> dict:
    """16 causal sequences of 32..2048 tokens (8 heads, D 64): packed vs padded to the longest."""
    lengths = np.geomspace(32, 2048, 16).astype(int)
    rng = np.random.default_rng(0)
    total, longest = int(lengths.sum()), int(lengths.max())
    q, k, v = (rng.standard_normal((total, 8, 64), dtype=np.float32) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lengths)])
    padded_q = np.zeros((16, 8, longest, 64), np.float32)
    for b, (start, n) in enumerate(zip(cu[:-1], lengths, strict=True)):
        padded_q[b, :, :n] = q[start : start + n].swapaxes(0, 1)
    longest_q = padded_q[int(np.argmax(lengths))][None]
    t = _bench.interleaved_medians(
        {
            "packed": lambda: cpuattn.attention_varlen(q, k, v, cu, cu, causal=True),
            "padded": lambda: attention(
                padded_q, padded_q, padded_q, causal="top_left", kv_lengths=lengths
            ),
            "longest": lambda: attention(longest_q, longest_q, longest_q, causal=True),
        },
        repeats,
    )
    packed, padded = t["packed"], t["padded"]
    # Time proportional to sum L^2: the longest sequence alone, scaled by sum L^2 / max L^2.
    sum_l2 = float((lengths.astype(float) ** 2).sum())
    return {
        "lengths": lengths.tolist(),
        "ms_packed": 1e3 * packed,
        "ms_padded": 1e3 * padded,
        "ms_sum_l2": 1e3 * t["longest"] * sum_l2 / longest**2,
        "work_ratio": 16 * longest**2 / sum_l2,
    }


def half_markdown(rows) -> str:
    """Each half-precision row against its float32 twin (same shape) and torch in the same dtype."""
    by_name = {r["case"]: r for r in rows}
    lines = []
    for name, twin in HALF_VS_FLOAT32.items():
        if name not in by_name:
            continue
        r = by_name[name]
        ours, f32 = r["ms"]["cpuattn"], r["ms"]["cpuattn float32"]
        line = (
            f"- {name}: {ours:.2f} ms, {f32 / ours:.2f}x cpuattn float32 on the same shape "
            f"({f32:.2f} ms, timed interleaved; the {twin} row)"
        )
        if "torch sdpa" in r["ms"]:
            line += f", {r['ms']['torch sdpa'] / ours:.2f}x torch SDPA in the same dtype"
        lines.append(line)
    return "\n".join(["", *lines]) if lines else ""


def variants_markdown(rows) -> str:
    """Score variants against the same call without them, timed interleaved in one case."""
    lines = [
        f"- {r['case']}: {r['ms']['cpuattn']:.2f} ms, "
        f"{r['ms']['cpuattn'] / r['ms']['cpuattn plain']:.2f}x the plain call "
        f"({r['ms']['cpuattn plain']:.2f} ms)"
        for r in rows
        if "cpuattn plain" in r["ms"]
    ]
    return "\n".join(["", *lines]) if lines else ""


def extras_markdown(x: dict) -> str:
    s, d = x["scaling"], x["decode"]
    lines = [
        "",
        (
            f"- threads: {s['case']} (1, 8, 4096, 64) takes {s['ms_1']:.1f} ms on 1 thread, "
            f"{s['ms_n']:.1f} ms on {s['threads']}: {s['speedup']:.2f}x"
        ),
        (
            f"- {d['case']}, cold caches ({d['layers']} layers' K/V visited in turn): "
            f"{d['ms']:.2f} ms per layer = {d['kv_gbs']:.1f} GB/s of K/V read, "
            f"{100 * d['kv_gbs'] / d['read_gbs']:.0f}% of the measured read bandwidth "
            f"({d['read_gbs']:.1f} GB/s: {d['threads']} threads reading "
            f"{d['sweep_gib']:.1f} GiB; L3 {d['l3_mib']:.0f} MiB)"
        ),
    ]
    if "half_decode" in x:
        parts = ", ".join(
            f"{name} {h['ms']:.2f} ms = {h['vs_f32']:.2f}x ({100 * h['kv_gbs'] / d['read_gbs']:.0f}% "
            "of read bandwidth)"
            for name, h in x["half_decode"].items()
        )
        lines.append(
            f"- half caches, cold, against the float32 cache's time (median of per-round "
            f"ratios): {parts}"
        )
    if "memory" in x:
        mem = ", ".join(
            f"{impl} {mib:.1f} MiB" for impl, mib in x["memory"].items() if mib is not None
        )
        lines.append(
            f"- peak memory beyond inputs and output, (1, 8, 32768, 64), fresh process: {mem}"
        )
    if "additive" in x:
        ad = x["additive"]
        lines.append(
            f"- additive (Bahdanau) attention (1, 8, 512, 32): {ad['ms']:.1f} ms vs NumPy "
            f"broadcasting the (Lq, Lk, D) cube {ad['ms_numpy']:.1f} ms "
            f"({ad['ms_numpy'] / ad['ms']:.1f}x)"
        )
    if "varlen" in x:
        vl = x["varlen"]
        lines.append(
            f"- varlen: 16 causal sequences of 32..2048 tokens, packed "
            f"{vl['ms_packed']:.1f} ms vs padded to the longest {vl['ms_padded']:.1f} ms "
            f"({vl['ms_padded'] / vl['ms_packed']:.1f}x; B·max L² / Σ L² = "
            f"{vl['work_ratio']:.1f}); {vl['ms_packed'] / vl['ms_sum_l2']:.2f}x the "
            f"longest sequence's time scaled by Σ L² / max L² "
            f"({vl['ms_sum_l2']:.1f} ms)"
        )
    if "dask" in x:
        lines.append(dask_cluster.markdown(x["dask"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--backward", action="store_true", help="the backward rows only")
    parser.add_argument("--models", action="store_true", help="the transformers rows only")
    parser.add_argument("--serving", action="store_true", help="the int8 and paged cache rows only")
    parser.add_argument(
        "--hybrid", action="store_true", help="the window + global tokens rows only"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help='write a GF/s vs L plot (needs matplotlib: pip install "cpuattn[plot]")',
    )
    args = parser.parse_args(argv)
    if args.plot and _bench.not_installed("matplotlib"):  # fail now, not after the run
        parser.error('--plot needs matplotlib: pip install "cpuattn[plot]"')

    facts = info()
    peak = _bench.sgemm_gflops()
    # On stdout too, above the tables: a saved table says what it measured, and on what.
    print(
        f"cpuattn {facts['version']}, isa={facts['isa']} (the CPU's: "
        f"{', '.join(facts['supported_isas'])}), {facts['max_threads']} threads, "
        f"{_bench.cpu_name()}, {time.strftime('%Y-%m-%d')}\n"
    )
    if args.backward:
        print(backward.markdown(backward.rows(args.repeats, peak), peak))
        return 0
    if args.models:
        print(models.markdown(models.rows(args.repeats), models.op_overhead()))
        return 0
    if args.serving:
        print(serving.markdown(serving.serving_rows(args.repeats)))
        return 0
    if args.hybrid:
        print(hybrid.markdown(hybrid.hybrid_rows(args.repeats)))
        return 0
    rows = []
    cases = QUICK if args.quick else FULL
    for n, case in enumerate(cases, 1):
        print(f"[{n}/{len(cases)}] {case.name} ...", file=sys.stderr, flush=True)
        rows.append(run_case(case, args.repeats, peak))
    what = "threads, decode bandwidth" + (
        "" if args.quick else ", memory, varlen, additive, dask cluster"
    )
    print(f"[extras] {what} ...", file=sys.stderr, flush=True)
    more = extras(args.repeats, args.quick)
    if not args.quick:
        print("[backward] ...", file=sys.stderr, flush=True)
        more["backward"] = backward.rows(args.repeats, peak)
        print("[models] ...", file=sys.stderr, flush=True)
        more["models"] = models.rows(min(args.repeats, 3))
        more["op_overhead"] = models.op_overhead()
        print("[serving] ...", file=sys.stderr, flush=True)
        more["serving"] = serving.serving_rows(args.repeats)
        print("[hybrid] ...", file=sys.stderr, flush=True)
        more["hybrid"] = hybrid.hybrid_rows(args.repeats)
    # The peak again after the cases, the higher of the two kept: a disturbed first reading
    # would inflate every % of peak.
    peak = max(peak, _bench.sgemm_gflops())
    for row, case in zip(rows, cases, strict=True):
        finish_row(row, case, peak)
    sections = [markdown(rows, peak), variants_markdown(rows), half_markdown(rows)]
    if "backward" in more:
        sections.append(backward.markdown(more["backward"], peak))
        sections.append(models.markdown(more["models"], more["op_overhead"]))
        sections.append(serving.markdown(more["serving"]))
        sections.append(hybrid.markdown(more["hybrid"]))
    print("\n".join(s for s in (*sections, extras_markdown(more)) if s))
    if args.json:
        with open(args.json, "w") as f:
            machine = {"cpu": _bench.cpu_name(), "date": time.strftime("%Y-%m-%d")}
            json.dump(
                {"info": facts, **machine, "sgemm_gflops": peak, "rows": rows, **more}, f, indent=1
            )
    if args.plot:
        plot(rows, args.plot, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
