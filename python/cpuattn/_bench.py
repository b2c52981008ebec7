"""Timing helpers and baselines shared by ``python -m cpuattn`` and ``benchmarks/run.py``.

Everything is timed in one process on the same inputs: median of repeats after a warm-up.
Implementations compared with each other run interleaved (a block of calls of each per round),
so a burst of load from elsewhere on a shared machine slows all of them alike and the ratios
hold.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ._api import attention


@dataclass(frozen=True)
class Case:
    """One attention problem: q (b, hq, lq, d), k/v (b, hkv, lk, d).

    kv_dtype: "float32", "float16" or "bfloat16" for k and v; q_dtype the same or float32.
    padding: keys per batch entry, the rest padding dropped by a (b, 1, 1, lk) bool mask,
    which every implementation is given (a padded batch as transformers runs it).
    """

    name: str
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool = False
    window: tuple[int, int] | None = None
    options: dict = field(default_factory=dict)
    q_dtype: str = "float32"
    kv_dtype: str = "float32"
    padding: tuple[int, ...] | None = None

    def inputs(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.b, self.hq, self.lq, self.d), dtype=np.float32)
        k = rng.standard_normal((self.b, self.hkv, self.lk, self.d), dtype=np.float32)
        v = rng.standard_normal((self.b, self.hkv, self.lk, self.d), dtype=np.float32)
        return (
            q.astype(_dtype(self.q_dtype)),
            k.astype(_dtype(self.kv_dtype)),
            v.astype(_dtype(self.kv_dtype)),
        )

    def mask(self) -> np.ndarray | None:
        """The padding mask, (b, 1, 1, lk) bool, or None."""
        if self.padding is None:
            return None
        return (np.arange(self.lk) < np.asarray(self.padding)[:, None])[:, None, None, :]

    def kwargs(self):
        padding = {} if self.padding is None else {"mask": self.mask()}
        return {"causal": self.causal, "window": self.window, **padding, **self.options}

    def key_lengths(self):
        """Valid keys per batch entry: kv_lengths or the padding if the case has them, else
        Lk."""
        if self.padding is not None:
            return list(self.padding)
        return list(self.options.get("kv_lengths", [self.lk] * self.b))

    def kept_pairs(self, n_keys: int) -> int:
        """(query, key) pairs kept in one head of a batch entry with n_keys valid keys."""
        i = np.arange(self.lq)[:, None]
        diag = i + n_keys - self.lq
        lo = np.zeros_like(diag)
        hi = np.full_like(diag, n_keys)
        if self.window is not None and self.window[0] >= 0:
            lo = np.maximum(lo, diag - self.window[0])
        if self.causal:
            hi = np.minimum(hi, diag + 1)
        if self.window is not None and self.window[1] >= 0:
            hi = np.minimum(hi, diag + self.window[1] + 1)
        return int(np.clip(hi - lo, 0, None).sum())

    def flops(self) -> float:
        """4 * D per kept pair (Q K^T and P V, multiply-add = 2 flops each): the work needed."""
        return 4.0 * self.hq * self.d * sum(self.kept_pairs(n) for n in self.key_lengths())

    def kv_bytes(self) -> int:
        """Bytes of valid K and V: what a decode step must read at least once."""
        itemsize = _dtype(self.kv_dtype).itemsize
        return 2 * self.hkv * self.d * itemsize * sum(self.key_lengths())


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    min_time: float = 0.2,
    rounds: int = 3,
    settle: float = 0.15,
) -> dict[str, float]:
    """Median wall time of each fn, timed in `rounds` rounds that each give every fn a block of
    consecutive calls: at least `repeats` timed calls in all, more (up to 200) while a block
    takes under min_time / rounds. A block starts with untimed calls for `settle` seconds:
    after a switch, the previous library's thread pool still spins (OpenBLAS's for ~0.1 s)
    and would be billed to the next one."""
    per_block = -(-repeats // rounds)
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < settle:
                fn()
            start = time.perf_counter()
            block = 0
            while block < per_block or (
                time.perf_counter() - start < min_time / rounds and block < 200 // rounds
            ):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
                block += 1
    return {name: float(np.median(t)) for name, t in times.items()}


def sgemm_gflops(n: int = 2048, calls: int = 10) -> float:
    """The practical float32 peak: NumPy's BLAS matmul of two n x n matrices, its fastest of
    `calls` timed calls. A peak is a best case: the median of a few calls read anywhere from
    106 to 192 GF/s on one shared machine, and every % of peak moved with it."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def l3_bytes() -> int:
    """The last-level cache of this machine as the OS reports it (0 when it does not)."""
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size > 0:
            return int(size)
    except (ValueError, OSError, AttributeError):
        pass
    try:  # Linux without the glibc sysconf name: sysfs, e.g. "300M" or "32768K"
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 0


def beyond_caches_bytes(at_least: int = 2**30) -> int:
    """A working set no cache holds: 1 GiB, or 4x the L3 where that is larger."""
    return max(at_least, 4 * l3_bytes())


def read_gbs(threads: int, nbytes: int | None = None, calls: int = 5) -> float:
    """Memory read bandwidth with `threads` threads: each reduces its own slice of a buffer
    larger than the caches (NumPy releases the GIL in the reduction); the fastest of `calls`
    sweeps. The reduction is max, NumPy's cheapest full read: its SIMD loop keeps up with
    memory where sum's pairwise loop does not (1.8x sum's rate on a 2-core Xeon)."""
    from concurrent.futures import ThreadPoolExecutor

    buf = np.ones((nbytes or beyond_caches_bytes()) // 4, dtype=np.float32)
    parts = np.array_split(buf, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))  # warm-up: pages touched, threads started
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def cold_decode_seconds(case: Case, repeats: int, **kwargs) -> tuple[float, int]:
    """Seconds per decode call when each call reads K/V no cache holds, as in a model: one
    cache per layer, enough layers to exceed the caches, visited in turn. Returns the median
    time per layer and the number of layers."""
    layers = max(2, -(-beyond_caches_bytes() // case.kv_bytes()))
    q, k, v = case.inputs()
    caches = [(k.copy(), v.copy()) for _ in range(layers)]
    options = {**case.kwargs(), **kwargs}

    def step():
        for kl, vl in caches:
            attention(q, kl, vl, **options)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) / layers)
    return float(np.median(times)), layers


def naive_numpy(q, k, v, causal=False, window=None, mask=None):
    """softmax(q k^T * scale) v with BLAS matmuls and an O(Lq x Lk) score matrix; mask: bool,
    broadcast to the scores."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k = np.repeat(k, group, axis=-3)
        v = np.repeat(v, group, axis=-3)
    s = (q @ np.swapaxes(k, -1, -2)) * np.float32(1.0 / np.sqrt(q.shape[-1]))
    if causal or window is not None:
        lq, lk = s.shape[-2:]
        i = np.arange(lq)[:, None] + (lk - lq)
        j = np.arange(lk)[None, :]
        keep = j <= i if causal else np.ones((lq, lk), bool)
        if window is not None:
            left, right = window
            if left >= 0:
                keep &= j >= i - left
            if right >= 0:
                keep &= j <= i + right
        s = np.where(keep, s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


def torch_sdpa_runner(q, k, v, causal=False, window=None, mask=None):
    """A zero-argument callable running torch SDPA on these inputs, or None without torch.

    Causal uses bottom-right alignment via is_causal when square, else an explicit mask; a
    window is passed as a boolean mask (torch has no native sliding window); a bool `mask` as
    attn_mask (with causal or a window, combined with theirs).
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    def tensor(x):  # bfloat16 (ml_dtypes) has no torch.from_numpy: go through float32
        if x.dtype.name == "bfloat16":
            return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(x)

    tq, tk, tv = (tensor(x) for x in (q, k, v))
    if tq.dtype != tk.dtype:  # torch needs one dtype: a float32 q on a half cache is cast
        tq = tq.to(tk.dtype)
    lq, lk = q.shape[-2], k.shape[-2]
    kw = {"enable_gqa": q.shape[-3] != k.shape[-3]}
    if window is not None or (causal and lq != lk):
        i = torch.arange(lq)[:, None] + (lk - lq)
        j = torch.arange(lk)[None, :]
        keep = (j <= i) if causal else torch.ones(lq, lk, dtype=torch.bool)
        if window is not None:
            if window[0] >= 0:
                keep &= j >= i - window[0]
            if window[1] >= 0:
                keep &= j <= i + window[1]
        kw["attn_mask"] = keep
    elif causal and mask is None:
        kw["is_causal"] = True
    elif causal:
        kw["attn_mask"] = torch.ones(lq, lk, dtype=torch.bool).tril()
    if mask is not None:
        kw["attn_mask"] = torch.from_numpy(np.asarray(mask)) & kw.get("attn_mask", True)

    def run():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, **kw)

    return run


def _torch_tensor(x):
    """x as a torch tensor: bfloat16 (ml_dtypes) has no torch.from_numpy, so its bits go
    through int16 (exact)."""
    import torch

    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def torch_flash_backward_runner(dout, q, k, v, out, lse, causal=False):
    """A zero-argument callable running torch's CPU flash-attention backward
    (``aten._scaled_dot_product_flash_attention_for_cpu_backward``, what SDPA's autograd calls
    on CPU) on these float32 or bfloat16 arrays and cpuattn's saved ``out`` and ``lse``
    (float32), returning ``(dq, dk, dv)``; None without torch. Same Hq and Hkv only (no GQA
    there); causal is top-left, the same as bottom-right for the square shapes timed."""
    try:
        import torch
    except ImportError:
        return None
    if q.shape[-3] != k.shape[-3]:
        return None
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    tensors = [_torch_tensor(x) for x in (dout, q, k, v, out, lse)]

    def run():
        with torch.inference_mode():
            return backward(*tensors, 0.0, causal)

    return run


def onnxruntime_runner(q, k, v, causal=False, window=None, mask=None):
    """A zero-argument callable running onnxruntime on these inputs, or None without it.

    The graph is the standard one: MatMul(q, k^T) * scale (+ a -inf bias for causal/window
    and a bool mask)
    -> Softmax -> MatMul(., v), on the CPU provider with its default threads. GQA K/V are
    repeated to Hq heads beforehand (untimed), as ONNX MatMul does not broadcast heads.
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = np.repeat(k, group, axis=-3), np.repeat(v, group, axis=-3)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = np.array(1.0 / np.sqrt(q.shape[-1]), np.float32)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
    ]
    inits = [numpy_helper.from_array(scale, "scale")]
    scores = "s1"
    if causal or window is not None or mask is not None:
        i = np.arange(lq)[:, None] + (lk - lq)
        j = np.arange(lk)[None, :]
        keep = (j <= i) if causal else np.ones((lq, lk), bool)
        if window is not None:
            if window[0] >= 0:
                keep &= j >= i - window[0]
            if window[1] >= 0:
                keep &= j <= i + window[1]
        if mask is not None:
            keep = keep & mask
        inits.append(numpy_helper.from_array(np.where(keep, 0, -np.inf).astype(np.float32), "bias"))
        nodes.append(helper.make_node("Add", ["s1", "bias"], ["s2"]))
        scores = "s2"
    nodes += [
        helper.make_node("Softmax", [scores], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["out"]),
    ]

    def tensor(name, x):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(x.shape))

    graph = helper.make_graph(
        nodes,
        "attention",
        [tensor("q", q), tensor("k", k), tensor("v", v)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"q": q, "k": k, "v": v}
    return lambda: session.run(None, feeds)


PEAK_SCRIPT = """
import json, sys
import numpy as np
from cpuattn import _bench

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

case = _bench.Case("peak", *{dims})
q, k, v = case.inputs()
out = np.ones_like(q)  # touched: the output is not extra memory
if {impl!r} == "cpuattn":
    run = lambda: _bench.attention(q, k, v, out=out, **case.kwargs())
else:
    run = _bench.torch_sdpa_runner(q, k, v, case.causal, case.window)
if run is None:
    print(json.dumps(None)); sys.exit()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
base = status("VmRSS")
run()
print(json.dumps((status("VmHWM") - base) / 1024))
"""


def peak_extra_mib(case: Case, impl: str = "cpuattn") -> float | None:
    """Peak resident memory a call adds beyond its inputs and output, in a fresh process (MiB):
    what an O(Lq x Lk) score matrix would show and an O(tile) kernel must not. Linux only
    (/proc/self/clear_refs resets the peak); None elsewhere or when the impl is missing."""
    import json
    import subprocess
    import sys

    dims = (case.b, case.hq, case.hkv, case.lq, case.lk, case.d, case.causal, case.window)
    script = PEAK_SCRIPT.format(dims=dims, impl=impl)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module says: every
    figure depends on it, so a saved table names it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def not_installed(*modules: str) -> list[str]:
    """The modules among these that fail to import (optional baselines: torch, onnxruntime)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


MAX_REL_ERR = (
    "max rel err = max|out - exact| / max|exact|, exact: the NumPy backend on float64 inputs"
)


def max_error_vs_float64(case: Case, out: np.ndarray) -> float:
    """Max |out - exact| / max |exact|, the exact result from float64 inputs (NumPy backend)."""
    q, k, v = (x.astype(np.float64) for x in case.inputs())
    exact = attention(q, k, v, backend="numpy", **case.kwargs())
    return float(np.abs(out.astype(np.float64) - exact).max() / np.abs(exact).max())
