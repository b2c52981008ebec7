"""What :mod:`cpuattn.dask` runs on a worker: one (query block, key block) pair, a merge of
partial results, an empty block. Plain NumPy in, NumPy out; no dask import needed here."""

from __future__ import annotations

import numpy as np

from ._api import attention, merge


def worker_threads() -> int | None:
    """Threads for one call on this dask worker: its thread count divided among the tasks it
    runs now, so that workers sharing a host do not oversubscribe it. None outside a worker
    (cpuattn's own default then applies)."""
    try:
        from distributed import get_worker

        state = get_worker().state
    except (ImportError, ValueError):  # no distributed, or not inside a worker task
        return None
    return max(1, state.nthreads // max(1, state.executing_count))


def attend_pair(q, k, v, mask, kv_lengths, alibi, diagonal, options):
    """``attention(..., return_lse=True)`` on one block pair.

    ``diagonal`` is an int, or an int array over the block's batch entries when they differ
    (bottom-right alignment with ``kv_lengths``: each sequence ends at its own length); the
    entries are then computed in groups of equal diagonal.
    """
    options = {**options, "num_threads": options["num_threads"] or worker_threads()}
    if np.ndim(diagonal) == 0:
        return attention(
            q,
            k,
            v,
            mask=mask,
            kv_lengths=kv_lengths,
            alibi_slopes=alibi,
            diagonal=int(diagonal),
            return_lse=True,
            **options,
        )
    batch = q.shape[:-3]
    if mask is not None:  # the block's mask may broadcast along batch axes
        mask = np.broadcast_to(mask, (*batch, *mask.shape[len(batch) :]))
    out = lse = None
    for d in np.unique(diagonal):
        entries = np.nonzero(diagonal == d)  # a tuple of index arrays over the batch axes
        part_out, part_lse = attention(
            q[entries],
            k[entries],
            v[entries],
            mask=None if mask is None else mask[entries],
            kv_lengths=None if kv_lengths is None else kv_lengths[entries],
            alibi_slopes=None if alibi is None else alibi[entries],
            diagonal=int(d),
            return_lse=True,
            **options,
        )
        if out is None or lse is None:
            out = np.empty((*batch, *part_out.shape[1:]), part_out.dtype)
            lse = np.empty((*batch, *part_lse.shape[1:]), part_lse.dtype)
        out[entries] = part_out
        lse[entries] = part_lse
    return out, lse


def merge_parts(*parts, out_dtype=None):
    """``merge`` of ``(out, lse)`` pairs; ``out_dtype`` casts the merged ``out`` (the root of
    the tree: parts are computed and merged in the compute dtype, rounded once at the end)."""
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    return (out if out_dtype is None else out.astype(out_dtype, copy=False)), lse


def empty_block(out_shape, out_dtype, lse_dtype):
    """A query block that keeps no key at all (every key block outside the band): 0, -inf."""
    return np.zeros(out_shape, out_dtype), np.full(out_shape[:-1], -np.inf, lse_dtype)


def sink_part(out_shape, sinks, dtype):
    """Sink logits ``(*batch, heads)`` as a merge part: out 0, lse the head's sink on each row."""
    lse = np.broadcast_to(np.asarray(sinks, dtype)[..., None], out_shape[:-1]).copy()
    return np.zeros(out_shape, dtype), lse
