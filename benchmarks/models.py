"""The models section of benchmarks/run.py: transformers models end to end with
attn_implementation="cpuattn" against "sdpa" (torch's own), on random configs, in one process
(issue #20's targets), and the per-call overhead of the torch custom op.

    python benchmarks/run.py --models
"""

from __future__ import annotations

import time

import numpy as np

import cpuattn


def _models():
    try:
        import torch
        import transformers

        import cpuattn.torch as ct
    except ImportError:
        return None
    return torch, transformers, ct


def _model(transformers, torch, family: str, **extra):
    """Llama-style sizes: hidden 1024, 16 heads of 64, 4 kv heads, 2 layers, random weights;
    family "Llama" or "Mistral" (with extra={"sliding_window": W})."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=1000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=16384,
        **extra,
    )
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def _medians(runners: dict, repeats: int) -> dict:
    """Median seconds of each runner, interleaved round by round (one warm-up call each)."""
    for run in runners.values():
        run()
    times: dict = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def _impl_runners(model, run, impls=("cpuattn", "sdpa")) -> dict:
    def runner(impl):
        def call():
            model.set_attn_implementation(impl)
            return run()

        return call

    return {impl: runner(impl) for impl in impls}


def rows(repeats: int = 3) -> list[dict] | None:
    found = _models()
    if found is None:
        return None
    torch, transformers, ct = found
    ct.register_transformers("cpuattn")
    out = []
    g = torch.Generator().manual_seed(0)

    def row(name, model, run, reps=repeats):
        t = _medians(_impl_runners(model, run), reps)
        out.append({"case": name, "s": t, "x_sdpa": t["sdpa"] / t["cpuattn"]})

    llama = _model(transformers, torch, "Llama")
    ids = torch.randint(0, 1000, (1, 4096), generator=g)
    with torch.inference_mode():
        row("Llama-style prefill L=4096", llama, lambda: llama(ids))
    mistral = _model(transformers, torch, "Mistral", sliding_window=1024)
    long_ids = torch.randint(0, 1000, (1, 8192), generator=g)
    with torch.inference_mode():
        row("Mistral-style window 1024 prefill L=8192", mistral, lambda: mistral(long_ids))
    with torch.inference_mode():
        row(
            "Llama-style generate 128 tokens after 4096",
            llama,
            lambda: llama.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False),
            reps=max(1, repeats // 2),
        )
    train_ids = ids[:, :2048]

    def train_step():
        llama.zero_grad()
        llama(train_ids, labels=train_ids).loss.backward()

    llama.train()
    row("Llama-style training step L=2048", llama, train_step)
    llama.eval()
    return out


def op_overhead(repeats: int = 200) -> dict | None:
    """A decode-sized call, (1, 32, 1, 128) against 4096 cached keys of 8 kv heads: the custom
    op against cpuattn.attention on the same memory and torch SDPA."""
    found = _models()
    if found is None:
        return None
    torch, _, ct = found
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, 1, 128, generator=g)
    k = torch.randn(1, 8, 4096, 128, generator=g)
    v = torch.randn(1, 8, 4096, 128, generator=g)
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    runners = {
        "cpuattn.torch": lambda: ct.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "cpuattn numpy": lambda: cpuattn.attention(qn, kn, vn),
        "torch sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, enable_gqa=True
        ),
    }
    with torch.inference_mode():
        t = _medians(runners, repeats)
    return {name: 1e6 * s for name, s in t.items()}  # microseconds


def markdown(result: list[dict] | None, overhead: dict | None) -> str:
    if result is None:
        return "\n- models: skipped (needs torch and transformers)"
    lines = [
        "",
        "transformers end to end, random configs, attn_implementation cpuattn vs sdpa:",
        "",
        "| case | cpuattn s | sdpa s | x sdpa |",
        "|---|---|---|---|",
    ]
    for r in result:
        lines.append(
            f"| {r['case']} | {r['s']['cpuattn']:.2f} | {r['s']['sdpa']:.2f} | {r['x_sdpa']:.2f} |"
        )
    if overhead:
        lines.append(
            "\n- decode-sized call (1, 32, 1, 128) on 4096 keys: "
            + ", ".join(f"{name} {us:.0f} µs" for name, us in overhead.items())
        )
    return "\n".join(lines)
