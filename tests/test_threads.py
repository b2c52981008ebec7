"""Concurrent calls from Python threads: same bits as sequential calls, no oversubscription."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference import random_qkv

import cpuattn
from cpuattn import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason="native backend not built")

CALL_OPTIONS = [
    {},
    {"causal": True},
    {"window": (20, 0), "causal": True},
    {"kv_lengths": np.array([100, 37])},
    {"return_lse": True},
]


def problems(rng, n):
    return [random_qkv(rng, (2,), 8, 2, 33 + i, 100 + 3 * i, 32) for i in range(n)]


def run(problem, options):
    return cpuattn.attention(*problem, **options)


def assert_bitwise(a, b):
    for x, y in zip(
        a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True
    ):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("shared", [False, True], ids=["own-inputs", "shared-inputs"])
def test_eight_threads_match_sequential_calls(rng, shared):
    data = problems(rng, 1 if shared else 8)
    jobs = [(data[i % len(data)], CALL_OPTIONS[i % len(CALL_OPTIONS)]) for i in range(48)]
    expected = [run(p, o) for p, o in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            got = list(pool.map(lambda job: run(*job), jobs))
            for a, b in zip(got, expected, strict=True):
                assert_bitwise(a, b)


def test_threads_writing_disjoint_slices_of_one_out(rng):
    q, k, v = random_qkv(rng, (8,), 4, 4, 40, 70, 16)
    expected = cpuattn.attention(q, k, v, causal=True)
    out = np.empty_like(expected)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(
            pool.map(
                lambda b: cpuattn.attention(q[b], k[b], v[b], causal=True, out=out[b]), range(8)
            )
        )
    assert np.array_equal(out, expected)


def test_default_threads_are_shared_among_calls_in_flight():
    core = _native._core
    cores = core.max_threads()
    assert core.threads_for_call(0, 1) == cores
    assert core.threads_for_call(0, 2) == max(1, cores // 2)
    assert core.threads_for_call(0, 10 * cores) == 1
    assert core.threads_for_call(3, 8) == (3 if core.openmp() else 1)  # explicit: honoured
    assert core.threads_for_call(10**6, 1) <= 4 * max(os.cpu_count(), 1) or not core.openmp()


def test_many_heads_bitwise_identical_for_any_thread_count(rng):
    """32 (batch, kv head) pairs of 3 query tiles: with few threads a task takes a whole pair
    (its packed K reused), with more each query tile is a task; the bits are the same."""
    q, k, v = random_qkv(rng, (4,), 16, 8, 150, 170, 40)
    kw = {"causal": True, "return_lse": True}
    expected = cpuattn.attention(q, k, v, num_threads=1, **kw)
    for threads in (2, 3, 5, 16):
        assert_bitwise(cpuattn.attention(q, k, v, num_threads=threads, **kw), expected)
