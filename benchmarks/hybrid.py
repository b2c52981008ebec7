"""Hybrid attention (a window plus global tokens): what the global tokens cost beside the window
alone, against the same pattern as a bool mask, and StreamingLLM decode on a long cache.

    python benchmarks/run.py --hybrid        # these rows only

Prefill (1, 8, 16384, 64) float32, window (256, 256): alone, with 4 global tokens, and the
same kept pairs as a (16384, 16384) bool mask (the only way to say it without global_tokens:
every tile computed). Decode q (1, 32, 1, 128) over a 65536-position cache of 8 kv heads,
4 sink tokens and a 1024-position window (StreamingLLM), timed on cold caches against the
same 1028 keys gathered into a cache of their own (equal times mean only those keys are read)
and against decode over the whole cache.
"""

from __future__ import annotations

import time

import numpy as np

import cpuattn
from cpuattn import _bench

PREFILL = (1, 8, 16384, 64)
WINDOW = (256, 256)
GLOBALS = 4
DECODE_Q, DECODE_KV = (1, 32, 1, 128), (1, 8, 65536, 128)
SINKS, RECENT = 4, 1024


def _bool_mask(n: int) -> np.ndarray:
    """The kept pairs of WINDOW + GLOBALS as a dense (n, n) bool mask."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    near = (j >= i - WINDOW[0]) & (j <= i + WINDOW[1])
    return near | (j < GLOBALS) | (i < GLOBALS)


def hybrid_rows(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(PREFILL, dtype=np.float32) for _ in range(3))
    t = _bench.interleaved_medians(
        {
            "window": lambda: cpuattn.attention(q, k, v, window=WINDOW),
            "window + globals": lambda: cpuattn.attention(
                q, k, v, window=WINDOW, global_tokens=GLOBALS
            ),
        },
        repeats,
    )
    return {
        "ms_window": 1e3 * t["window"],
        "ms_hybrid": 1e3 * t["window + globals"],
        "ms_mask": 1e3 * _as_mask_seconds(q, k, v),
        "decode": _streaming_decode(rng, repeats),
    }


def _as_mask_seconds(q, k, v) -> float:
    """One call with the pattern as a bool mask (seconds a call: one is enough to see it),
    its 256 MiB mask freed on return."""
    mask = _bool_mask(PREFILL[2])
    t = _bench.interleaved_medians(
        {"mask": lambda: cpuattn.attention(q, k, v, mask=mask)},
        repeats=1,
        min_time=0,
        rounds=1,
        settle=0,
    )
    return t["mask"]


def _streaming_decode(rng, repeats: int) -> dict:
    q = rng.standard_normal(DECODE_Q, dtype=np.float32)
    k, v = (rng.standard_normal(DECODE_KV, dtype=np.float32) for _ in range(2))
    kept = np.r_[0:SINKS, DECODE_KV[2] - RECENT : DECODE_KV[2]]
    k_kept, v_kept = np.ascontiguousarray(k[:, :, kept]), np.ascontiguousarray(v[:, :, kept])
    calls = {
        "streaming": lambda: cpuattn.attention(
            q, k, v, causal=True, window=(RECENT - 1, 0), global_tokens=SINKS
        ),
        "gathered": lambda: cpuattn.attention(q, k_kept, v_kept),
        "whole cache": lambda: cpuattn.attention(q, k, v, causal=True),
    }
    seconds = _cold_calls(calls, max(repeats, 9))
    return {
        "ms_streaming": 1e3 * seconds["streaming"],
        "ms_gathered": 1e3 * seconds["gathered"],
        "ms_whole": 1e3 * seconds["whole cache"],
        "kept_keys": len(kept),
        "cache_keys": DECODE_KV[2],
    }


def _cold_calls(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call with cold CPU caches: a sweep over more memory than the
    caches hold before every timed call (untimed), the calls taken in turn."""
    sweep = np.ones(_bench.beyond_caches_bytes() // 8)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            sweep.sum()
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def markdown(result: dict) -> str:
    d = result["decode"]
    w, h, m = result["ms_window"], result["ms_hybrid"], result["ms_mask"]
    return "\n".join(
        [
            "",
            (
                f"- hybrid {PREFILL}, window {WINDOW} + {GLOBALS} global tokens: {h:.1f} ms = "
                f"{h / w:.2f}x the window alone ({w:.1f} ms); the same pattern as a bool mask "
                f"{m:.0f} ms ({m / h:.0f}x slower)"
            ),
            (
                f"- StreamingLLM decode {DECODE_Q} over {d['cache_keys']} positions, {SINKS} "
                f"sinks + {RECENT}-position window, cold: {d['ms_streaming']:.3f} ms vs "
                f"{d['ms_gathered']:.3f} ms for the same {d['kept_keys']} keys in a cache of "
                f"their own ({d['ms_streaming'] / d['ms_gathered']:.2f}x) and "
                f"{d['ms_whole']:.2f} ms for the whole cache"
            ),
        ]
    )


if __name__ == "__main__":
    print(markdown(hybrid_rows(5)))
