"""Serving caches: decode over int8 and paged K/V caches against the float16 and contiguous
ones, as bytes read per second and against the machine's measured read bandwidth.

    python benchmarks/run.py --serving       # these rows only

Every row is a decode step, q (B, 32, 1, 128) over 8 kv heads, timed on cold caches: one
cache per layer, visited in turn (as in a model). The single-sequence rows are timed in
rounds, every row once a round, so that all their layers together exceed the CPU caches and
the "speed vs" column is the median of per-round ratios (both rows timed in the same round:
this VM's speed drifts 10-20 % between runs, more than the differences measured). "GB/s"
counts the bytes the call must read: K and V rows of the valid keys, plus the int8 scales.
Paged caches are (num_blocks, 16, 8, 128) arrays, blocks in shuffled order, stored as
PagedKVCache stores them (each block's kv heads one after the other) or, rows marked
"positions first", in the order of their axes (flash-attn's memory order).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

import cpuattn
from cpuattn import _bench

HQ, HKV, D, LK = 32, 8, 128, 16384
BLOCK = 16
# Rows of blocks stored in the order of their axes (flash-attn's, position then head); the
# others are stored as PagedKVCache stores them, each block's heads one after the other.
POSITIONS_FIRST = ", positions first"
MIXED = (16384, 512, 9000, 3000, 77, 12000, 2048, 100, 6000, 16384, 700, 4096, 1, 8000, 250, 5000)


def _interleaved_cold(
    makers: dict[str, tuple[Callable[[], Callable[[], object]], int]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of one layer's call per round for each name: its layers (made by `make`, of
    `layer_bytes` each, at least 2) visited in turn, every name once a round. Between two
    visits of a layer all the other names' layers are read too, so together they need only
    exceed the caches."""
    share = _bench.beyond_caches_bytes() // len(makers)
    calls = {
        name: [make() for _ in range(max(2, -(-share // nbytes)))]
        for name, (make, nbytes) in makers.items()
    }
    for layer_calls in calls.values():
        for call in layer_calls:
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, layer_calls in calls.items():
            t0 = time.perf_counter()
            for call in layer_calls:
                call()
            times[name].append((time.perf_counter() - t0) / len(layer_calls))
    return times


def _cold(make: Callable[[], Callable[[], object]], layer_bytes: int, repeats: int) -> float:
    """Median seconds of one layer's call, layers visited in turn (each made by `make`)."""
    layers = max(2, -(-_bench.beyond_caches_bytes() // layer_bytes))
    calls = [make() for _ in range(layers)]
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - t0) / layers)
    return float(np.median(times))


def _paged(x: np.ndarray, table: np.ndarray, num_blocks: int, heads_first: bool) -> np.ndarray:
    """(B, Hkv, L, ...) -> a (num_blocks, BLOCK, Hkv, ...) cache holding it where table says:
    in that memory order (flash-attn's), or heads first in each block (PagedKVCache's)."""
    b, h, n = x.shape[:3]
    shape = (num_blocks, h, BLOCK) if heads_first else (num_blocks, BLOCK, h)
    store = np.zeros((*shape, *x.shape[3:]), x.dtype)
    cache = store.swapaxes(1, 2) if heads_first else store
    per_seq = n // BLOCK
    for i in range(b):
        cache[table[i, :per_seq]] = np.moveaxis(x[i], 0, 1).reshape(per_seq, BLOCK, h, *x.shape[3:])
    return cache


def _tokens_major(x: np.ndarray) -> np.ndarray:
    """The same data laid out (B, L, H, ...) as pages are, viewed (B, H, L, ...)."""
    return np.ascontiguousarray(np.moveaxis(x, 1, 2)).swapaxes(1, 2)


def serving_rows(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HQ, 1, D), dtype=np.float32)
    k32 = rng.standard_normal((1, HKV, LK, D), dtype=np.float32)
    v32 = rng.standard_normal((1, HKV, LK, D), dtype=np.float32)
    k16, v16 = k32.astype(np.float16), v32.astype(np.float16)
    (k8, ks), (v8, vs) = cpuattn.quantize_int8(k32), cpuattn.quantize_int8(v32)
    blocks = LK // BLOCK
    table = rng.permutation(blocks).astype(np.int32)[None]
    lengths = np.array([LK])
    half_bytes, int8_bytes = 2 * HKV * LK * D * 2, 2 * HKV * LK * (D + 4)

    def dense(k, v, ks=None, vs=None):
        return cpuattn.attention(q, k, v, k_scale=ks, v_scale=vs)

    def paged(k, v, ks=None, vs=None):
        return cpuattn.attention_paged(q, k, v, table, lengths, k_scale=ks, v_scale=vs)

    int8 = (k8, v8, ks, vs)
    variants = {  # name: (call, its arrays, bytes read)
        "float32 cache": (dense, (k32, v32), 2 * half_bytes),
        "float16 cache": (dense, (k16, v16), half_bytes),
        "int8 cache": (dense, int8, int8_bytes),
        "float16 cache (B, L, H, D)": (dense, tuple(map(_tokens_major, (k16, v16))), half_bytes),
        "int8 cache (B, L, H, D)": (dense, tuple(map(_tokens_major, int8)), int8_bytes),
    }
    for name, arrays, nbytes in (("float16", (k16, v16), half_bytes), ("int8", int8, int8_bytes)):
        for suffix, heads_first in (("", True), (POSITIONS_FIRST, False)):
            variants[f"paged {name}, blocks of 16{suffix}"] = (
                paged,
                tuple(_paged(x, table, blocks, heads_first) for x in arrays),
                nbytes,
            )

    def maker(call, arrays):
        def make():  # each layer its own copy: memory no cache holds
            copies = tuple(x.copy(order="K") for x in arrays)  # in the same memory order
            return lambda: call(*copies)

        return make

    rounds = _interleaved_cold(  # rounds are cheap (~0.1 s): enough for steady ratios
        {name: (maker(call, arrays), nbytes) for name, (call, arrays, nbytes) in variants.items()},
        max(15, repeats),
    )
    rows: dict[str, dict] = {}
    for name, (_, _, nbytes) in variants.items():
        seconds = float(np.median(rounds[name]))
        rows[name] = {"ms": 1e3 * seconds, "gbs": nbytes / seconds / 1e9, "rounds": rounds[name]}
    rows["batch of 16 mixed lengths, paged int8"] = _mixed_batch(rng, repeats)
    return {"rows": rows, "read_gbs": _bench.read_gbs(cpuattn.info()["max_threads"])}


def _mixed_batch(rng, repeats: int) -> dict:
    """16 sequences of MIXED lengths decoding one token each, in one attention_paged call."""
    cache = cpuattn.PagedKVCache(sum(-(-n // BLOCK) for n in MIXED), BLOCK, HKV, D, dtype=np.int8)
    seqs = [cache.add_sequence() for _ in MIXED]
    for seq, n in zip(seqs, MIXED, strict=True):
        x = rng.standard_normal((1, HKV, n, D), dtype=np.float32)
        cache.append(seq, x, x)
    q = rng.standard_normal((len(MIXED), HQ, 1, D), dtype=np.float32)
    table, lengths = cache.block_table(seqs), cache.lengths(seqs)
    nbytes = 2 * HKV * sum(MIXED) * (D + 4)

    def make():  # copies in the same memory order as the cache's (heads first in a block)
        k, v = cache.k_cache.copy(order="K"), cache.v_cache.copy(order="K")
        ks, vs = cache.k_scale.copy(order="K"), cache.v_scale.copy(order="K")
        return lambda: cpuattn.attention_paged(q, k, v, table, lengths, k_scale=ks, v_scale=vs)

    seconds = _cold(make, nbytes, repeats)
    return {"ms": 1e3 * seconds, "gbs": nbytes / seconds / 1e9}


# Each row's speed against another's (how many times faster), in the table's last column.
COMPARED = {
    "int8 cache": ("float16 cache",),
    "int8 cache (B, L, H, D)": ("float16 cache (B, L, H, D)",),
    "paged float16, blocks of 16": ("float16 cache",),
    "paged int8, blocks of 16": ("int8 cache",),
    f"paged float16, blocks of 16{POSITIONS_FIRST}": (
        "float16 cache",
        "float16 cache (B, L, H, D)",
    ),
    f"paged int8, blocks of 16{POSITIONS_FIRST}": ("int8 cache", "int8 cache (B, L, H, D)"),
}


def _speed(reference: dict, row: dict) -> float:
    """How many times faster `row` is than `reference`: the median of per-round ratios where
    both were timed in rounds, else the ratio of their medians."""
    if "rounds" in reference and "rounds" in row:
        return float(np.median(np.array(reference["rounds"]) / np.array(row["rounds"])))
    return reference["ms"] / row["ms"]


def markdown(result: dict) -> str:
    rows, read = result["rows"], result["read_gbs"]
    title = (
        f"Serving caches: decode q (B, {HQ}, 1, {D}) over {HKV} kv heads, cold caches; "
        f"read bandwidth {read:.1f} GB/s"
    )
    lines = [
        title,
        "",
        "| cache | ms | GB/s read | % of read bandwidth | speed vs |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        versus = ", ".join(
            f"{_speed(rows[other], row):.2f}x {other}" for other in COMPARED.get(name, ())
        )
        lines.append(
            f"| {name} | {row['ms']:.3f} | {row['gbs']:.1f} | {100 * row['gbs'] / read:.0f}% "
            f"| {versus} |"
        )
    return "\n".join(lines)
