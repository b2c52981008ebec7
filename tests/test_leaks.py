"""20 000 calls of every kind, errors included: RSS and traced Python memory stay flat."""

import gc
import os
import tracemalloc

import numpy as np
import pytest

import cpuattn

CALLS = 20_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_calls(backend):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 9, 8)).astype(np.float32)
    mask = rng.random((5, 9)) > 0.3
    out = np.empty_like(q)

    def call(**kw):
        return lambda: cpuattn.attention(q, k, v, backend=backend, **kw)

    return [
        call(),
        call(causal=True, return_lse=True),
        call(window=(2, 1), kv_lengths=np.array([9, 4])),
        call(mask=mask, out=out),
        call(mask=np.where(mask, 0.0, -np.inf)),
        lambda: cpuattn.attention(q.swapaxes(-1, -2)[..., :8, :], k, v, backend=backend),
        lambda: cpuattn.attention(q, q, q, out=q.copy(), backend=backend),
        call(mask=np.ones((3, 3), bool)),  # ValueError
        call(num_threads=0),  # ValueError
        lambda: cpuattn.attention(q.astype(np.int32), k, v, backend=backend),  # TypeError
        lambda: cpuattn.merge(*zip(cpuattn.attention(q, k, v, return_lse=True, backend=backend))),
    ]


def run_calls(calls, n):
    for i in range(n):
        try:
            calls[i % len(calls)]()
        except (ValueError, TypeError):
            pass


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_many_calls_do_not_grow_memory(backend):
    if backend == "native" and not cpuattn.info()["native"]:
        pytest.skip("native backend not built")
    calls = make_calls(backend)
    n = CALLS if backend == "native" else CALLS // 10  # the NumPy backend is slower per call
    run_calls(calls, 2000)  # warm-up: caches, allocator pools, lazily imported modules
    rss_before = rss_bytes()
    tracemalloc.start()
    try:
        # A full collection also empties the interpreter's free lists (tuples, floats, ...),
        # which would otherwise count as growth until they fill up.
        gc.collect()
        traced_before = tracemalloc.get_traced_memory()[0]
        run_calls(calls, n)
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - traced_before
    finally:
        tracemalloc.stop()
    rss_growth = rss_bytes() - rss_before
    assert rss_growth < 5 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB over {n} calls"
    assert traced_growth < 64 * 2**10, f"traced memory grew {traced_growth} bytes over {n} calls"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_threads_that_exit_leave_no_scratch_behind():
    """The native backend keeps a calling thread's small scratch blocks for its next call
    (up to 1 MiB a thread): a thread that ends frees them. 400 short-lived threads, each
    calling once with ~100 KiB of scratch: RSS stays flat."""
    if not cpuattn.info()["native"]:
        pytest.skip("native backend not built")
    import threading

    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 256, 64)).astype(np.float32)

    def run_threads(n):
        for _ in range(n):
            t = threading.Thread(target=cpuattn.attention, args=(q, q, q))
            t.start()
            t.join()

    run_threads(50)
    rss_before = rss_bytes()
    run_threads(400)
    rss_growth = rss_bytes() - rss_before
    assert rss_growth < 16 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB over 400 threads"
