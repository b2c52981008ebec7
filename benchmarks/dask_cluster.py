"""The distributed row: cpuattn.dask on a LocalCluster of 2 single-thread worker processes
against one local 2-thread call, causal (1, 8, 16384, 64), keys and queries in 4 chunks.

    python benchmarks/dask_cluster.py [--repeats N] [--length L]

Also part of ``benchmarks/run.py`` (full run). Reports both times (median; the cluster's
includes sending the result to this process), the ratio, the largest error against the local
call, and the peak resident memory of one worker during a run that keeps the result on the
workers: above its memory before the run (which holds its share of the input chunks),
against the size of one chunk (an Lq x Lk score block of one pair would be 64 MiB per head).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from cpuattn import _bench

SHAPE = (1, 8, 16384, 64)
CHUNKS = 4


def _reset_peak() -> int:
    """On a worker: reset the peak resident size (Linux) and return the resident size, KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _peak() -> int:
    return _status("VmHWM")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def dask_vs_local(repeats: int, length: int = SHAPE[2]) -> dict | None:
    """None when dask or distributed is not installed."""
    if _bench.not_installed("dask", "distributed"):
        return None
    import dask.array as da
    import distributed

    import cpuattn.dask

    shape = (*SHAPE[:2], length, SHAPE[3])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    chunks = (1, shape[1], length // CHUNKS, shape[3])
    # Worker-to-worker copies on one host run at GB/s; with dask's 100 MB/s default estimate
    # its work stealing left the causal graph's first K/V blocks' worker with most of the work
    # (docs/guide/distributed.rst).
    import dask

    dask.config.set({"distributed.scheduler.bandwidth": "5GB"})
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # dask's "large graph" note on shipping the inputs
        dq, dk, dv = client.persist([da.from_array(x, chunks=chunks) for x in (q, k, v)])
        distributed.wait([dq, dk, dv])
        lazy = cpuattn.dask.attention(dq, dk, dv, causal=True)
        result = client.compute(lazy, sync=True)  # warm-up, and the result checked
        local = cpuattn.attention(q, k, v, causal=True, num_threads=2)
        err = float(np.abs(result - local).max() / np.abs(local).max())
        times = _bench.interleaved_medians(
            {
                "local": lambda: cpuattn.attention(q, k, v, causal=True, num_threads=2),
                "cluster": lambda: client.compute(lazy, sync=True),
            },
            repeats,
        )
        # Memory: one more run whose result stays on the workers (persist), as in a pipeline
        # that goes on with it or writes it out; compute() would also assemble the whole
        # output on one worker (dask's finalize task) before sending it here.
        before = client.run(_reset_peak)
        kept = client.persist(lazy)
        distributed.wait(kept)
        peaks = client.run(_peak)
        del kept
    worker = max(peaks, key=lambda w: peaks[w] - before[w])
    return {
        "shape": list(shape),
        "chunks": CHUNKS,
        "ms_local": 1e3 * times["local"],
        "ms_cluster": 1e3 * times["cluster"],
        "ratio": times["cluster"] / times["local"],
        "max_rel_err": err,
        "worker_peak_mib": peaks[worker] / 1024,
        "worker_extra_mib": (peaks[worker] - before[worker]) / 1024,
        "chunk_mib": q.nbytes / CHUNKS / 2**20,
        "input_mib": 3 * q.nbytes / 2**20,
    }


def markdown(d: dict) -> str:
    return (
        f"- dask: causal {tuple(d['shape'])}, queries and keys in {d['chunks']} chunks, "
        f"2 single-thread worker processes {d['ms_cluster']:.0f} ms vs one local 2-thread "
        f"call {d['ms_local']:.0f} ms ({d['ratio']:.2f}x; max rel err {d['max_rel_err']:.1e}); "
        f"peak memory of one worker (result kept on the workers) {d['worker_peak_mib']:.0f} "
        f"MiB, {d['worker_extra_mib']:.0f} MiB above its resident size before the run "
        f"(one chunk of q, k, v or out: {d['chunk_mib']:.0f} MiB; all inputs: "
        f"{d['input_mib']:.0f} MiB)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--length", type=int, default=SHAPE[2], help="L (default 16384)")
    args = parser.parse_args(argv)
    row = dask_vs_local(args.repeats, args.length)
    if row is None:
        print('dask not installed: pip install "cpuattn[dask]"', file=sys.stderr)
        return 1
    print(markdown(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
