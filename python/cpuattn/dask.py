"""Attention over dask arrays: batch, head, query and key chunks on any dask scheduler.

``pip install "cpuattn[dask]"``. Each (query block, key block) pair is one call of
:func:`cpuattn.attention` placed on the global diagonal with ``diagonal=``; the partial
``(out, lse)`` of a query block's key blocks combine with :func:`cpuattn.merge` in a tree
(sequence parallelism, exact up to float32 rounding). See docs/guide/distributed.rst.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

try:
    import dask.array as da
    from dask import delayed
except ImportError as exc:
    raise ImportError(f'cpuattn.dask needs dask: pip install "cpuattn[dask]" ({exc})') from exc

from ._api import BACKENDS
from ._dask_tasks import attend_pair, empty_block, merge_parts, sink_part
from ._numpy import key_bounds, key_caps
from ._request import MAX_DIAGONAL, Request, as_int, build_request, check_choice

__all__ = ["attention"]


def attention(
    q,
    k,
    v,
    *,
    mask=None,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    return_lse=False,
    num_threads=None,
    backend="auto",
    out_dtype=None,
    softcap=None,
    alibi_slopes=None,
    diagonal=None,
    split_every=8,
    sinks=None,
    global_tokens=None,
):
    """:func:`cpuattn.attention` over dask arrays, as lazy dask arrays.

    Parameters
    ----------
    q, k, v : dask or NumPy arrays, shapes as for :func:`cpuattn.attention`
        A NumPy array is wrapped as one chunk. Chunks along the batch axes, heads, ``Lq`` and
        ``Lk`` spread the work; ``D`` and ``Dv`` must be whole (one chunk). Query head chunks
        must hold whole GQA groups (multiples of ``Hq // Hkv``); k and v must be chunked
        alike, and follow q's batch and head chunks (rechunked to them if they do not).
    mask : dask or NumPy array broadcastable to ``(*batch, Hq, Lq, Lk)``, optional
        Rechunked alongside q (batch, heads, queries) and k (keys); broadcast axes stay one
        chunk.
    causal, window, scale, kv_lengths, out_dtype, softcap, alibi_slopes, diagonal, sinks, backend
        As for :func:`cpuattn.attention`, for the whole arrays (positions are global).
        ``kv_lengths``, ``alibi_slopes`` and ``sinks`` are small and are read when the graph
        is built (a dask array there is computed). The sinks join each query block's merge
        once, as one more part (out 0, lse = sink).
    global_tokens : int or sorted 1-D int array, optional
        As for :func:`cpuattn.attention`, in the whole arrays' positions: a block pair
        outside the window's band runs only when global tokens keep some of its pairs (a
        global key in its key block, or a global query in its query block), with the
        positions shifted to its own keys.
    return_lse : bool
        Also return the lse, a lazy ``(*batch, Hq, Lq)`` array.
    num_threads : int, optional
        Threads per block call. Default: on a dask.distributed worker, its thread count
        divided among the tasks it runs at that moment; elsewhere cpuattn's default.
    split_every : int
        Key-block partial results merged per task of the merge tree (at least 2).

    Returns
    -------
    out : dask array, or ``(out, lse)``
        As :func:`cpuattn.attention` returns them, lazily. Chunked like q (``Dv`` whole); the
        lse like q without ``D``.

    Raises
    ------
    TypeError, ValueError
        When the graph is built, never on a worker: every check of
        :func:`cpuattn.attention`, plus chunks that split ``D``, ``Dv`` or a GQA group,
        unknown (NaN) chunk sizes and k and v chunked differently.

    Notes
    -----
    ``out=`` and ``return_weights`` of :func:`cpuattn.attention` are not taken: the result is
    lazy, and the weights are ``Lq x Lk``. A (query block, key block) pair wholly outside the
    causal / window band (and the global tokens), or past every ``kv_lengths`` entry of its
    batch block, creates no task; a pair wholly inside runs with no causal or window bounds.
    Key blocks of one query block are merged in a tree of ``split_every``-way merges, in the compute dtype; half-precision output is rounded once,
    at the root.

    Examples
    --------
    >>> import dask.array as da, numpy as np, cpuattn, cpuattn.dask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 4, 256, 32), dtype=np.float32) for _ in range(3))
    >>> dq, dk, dv = (da.from_array(x, chunks=(1, 4, 64, 32)) for x in (q, k, v))
    >>> out = cpuattn.dask.attention(dq, dk, dv, causal=True)
    >>> out.chunks[2]
    (64, 64, 64, 64)
    >>> bool(np.allclose(out.compute(), cpuattn.attention(q, k, v, causal=True), atol=1e-5))
    True
    """
    check_choice("backend", backend, BACKENDS)
    split_every = as_int("split_every", split_every, "an int >= 2")
    if split_every < 2:
        raise ValueError(f"split_every: expected an int >= 2, got {split_every}")
    q, k, v = (_as_dask(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    dmask = None if mask is None else _as_dask("mask", mask)
    req = build_request(
        _stand_in(q),
        _stand_in(k),
        _stand_in(v),
        mask=None if dmask is None else _stand_in(dmask, mask=True),
        causal=causal,
        window=window,
        scale=scale,
        kv_lengths=None if kv_lengths is None else np.asarray(kv_lengths),
        num_threads=num_threads,
        out_dtype=out_dtype,
        softcap=softcap,
        alibi_slopes=None if alibi_slopes is None else np.asarray(alibi_slopes),
        diagonal=diagonal,
        sinks=None if sinks is None else np.asarray(sinks),
        global_tokens=global_tokens,
    )
    if req.diagonal is not None and abs(req.diagonal) + req.lq + req.lk > MAX_DIAGONAL:
        # Each block pair's call takes diagonal + (its first query - its first key).
        raise ValueError(
            f"diagonal: expected |diagonal| + Lq + Lk <= 2**61 for blocks of it to be valid "
            f"calls, got {req.diagonal} with Lq = {req.lq}, Lk = {req.lk}"
        )
    if req.globals is not None and int(req.globals[0]) - req.lk < -MAX_DIAGONAL:
        # Each block pair's call takes the positions minus its first key.
        raise ValueError(
            f"global_tokens: expected positions >= -2**61 + Lk for blocks of them to be valid "
            f"calls, got {int(req.globals[0])} with Lk = {req.lk}"
        )
    if req.squeeze_head:
        q, k, v = q[None], k[None], v[None]
    q, k, v = _check_chunks(req, q, k, v)
    if dmask is not None:
        dmask = _chunk_mask(req, dmask, q, k)
    out, lse = _Graph(req, q, k, v, dmask, backend, split_every).build()
    if req.squeeze_head:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _as_dask(name: str, x) -> da.Array:
    """A dask array with known chunk sizes (NumPy: one chunk)."""
    if not isinstance(x, da.Array):
        x = np.asarray(x)
        x = da.from_array(x, chunks=x.shape or ())
    if any(math.isnan(c) for axis in x.chunks for c in axis):
        raise ValueError(
            f"{name}: unknown chunk sizes (NaN) along axes "
            f"{[i for i, axis in enumerate(x.chunks) if any(math.isnan(c) for c in axis)]}; "
            f"call {name}.compute_chunk_sizes() first"
        )
    return x


def _stand_in(x: da.Array, mask: bool = False) -> np.ndarray:
    """A zero-strided NumPy view of x's shape and dtype (no memory): what build_request checks.
    A floating mask stands in as bool: it would be cast, and a cast of a broadcast view is a
    full-size copy; its dtype is then checked on its own."""
    dtype = x.dtype
    if mask and (dtype.kind == "f" or dtype.name == "bfloat16"):
        dtype = np.dtype(bool)
    return np.broadcast_to(np.zeros((), dtype), x.shape)


def _check_chunks(req: Request, q: da.Array, k: da.Array, v: da.Array):
    """Chunks every block call can take: whole D / Dv, whole GQA groups, k and v alike; k and
    v follow q's batch and head chunks."""
    nb = len(req.batch_shape)
    for name, x, what in (("q", q, "D"), ("k", k, "D"), ("v", v, "Dv")):
        if len(x.chunks[-1]) > 1:
            raise ValueError(
                f"{name}: chunks {x.chunks[-1]} split the head dim {what} = {x.shape[-1]}; each "
                f"block needs whole rows: {name}.rechunk({{-1: -1}})"
            )
    if k.chunks[:-1] != v.chunks[:-1]:
        raise ValueError(
            f"v: chunks {v.chunks[:-1]} along (*batch, Hkv, Lk) differ from k's "
            f"{k.chunks[:-1]}; k and v must be chunked alike"
        )
    g = req.group
    if g and any(c % g for c in q.chunks[nb]):
        raise ValueError(
            f"q: head chunks {q.chunks[nb]} split GQA groups ({req.hq} query heads over "
            f"{req.hkv} kv heads, {g} per group); chunk q's heads in multiples of {g}"
        )
    follow = {
        **dict(enumerate(q.chunks[:nb])),
        nb: tuple(c // g for c in q.chunks[nb]) if g else -1,
    }
    return q, k.rechunk(follow), v.rechunk(follow)


def _chunk_mask(req: Request, mask: da.Array, q: da.Array, k: da.Array) -> da.Array:
    """The mask with the canonical ndim, chunked like q (batch, heads, Lq) and k (Lk) along
    its full-size axes; axes it broadcasts along stay one chunk of 1."""
    ndim = len(req.batch_shape) + 3
    mask = mask.reshape((1,) * (ndim - mask.ndim) + mask.shape)
    target = [*q.chunks[:-1], k.chunks[-2]]
    return mask.rechunk(
        tuple((1,) if size == 1 else target[axis] for axis, size in enumerate(mask.shape))
    )


class _Graph:
    """The tasks of one call: a pair task per needed (batch, head, query, key) block, a merge
    tree per (batch, head, query) block, then the blocks assembled into lazy arrays."""

    def __init__(self, req, q, k, v, mask, backend, split_every):
        self.req, self.split_every = req, split_every
        self.nb = nb = len(req.batch_shape)
        self.q, self.k, self.v = (x.to_delayed() for x in (q, k, v))
        self.mask = None if mask is None else mask.to_delayed()
        self.mask_shape = () if mask is None else mask.shape
        self.batch_chunks = q.chunks[:nb]
        self.head_chunks, self.q_chunks, self.k_chunks = (
            q.chunks[nb],
            q.chunks[nb + 1],
            k.chunks[-2],
        )
        # Only causal, window and ALiBi read the diagonal; otherwise one value serves all.
        self.positional = req.causal or req.window != (-1, -1) or req.alibi is not None
        self.options = {
            "scale": req.scale,
            "softcap": req.softcap or None,
            "num_threads": req.num_threads,
            "backend": backend,
        }

    def build(self):
        req, nb = self.req, self.nb
        grid = [len(c) for c in (*self.batch_chunks, self.head_chunks, self.q_chunks)]
        outs = np.empty((*grid, 1), dtype=object)  # Dv: one chunk
        lses = np.empty(grid, dtype=object)
        for index in itertools.product(*(range(n) for n in grid)):
            shape = self._block_shape(index)
            out, lse = self._query_block(index, shape)
            out_index = (*index, 0)  # Dv: block 0
            outs[out_index] = da.from_delayed(
                out, shape, dtype=req.out_dtype, meta=np.empty((0,) * (nb + 3), req.out_dtype)
            )
            lses[index] = da.from_delayed(
                lse, shape[:-1], dtype=req.dtype, meta=np.empty((0,) * (nb + 2), req.dtype)
            )
        return da.block(outs.tolist()), da.block(lses.tolist())

    def _block_shape(self, index) -> tuple[int, ...]:
        chunks = (*self.batch_chunks, self.head_chunks, self.q_chunks)
        return (*(c[i] for c, i in zip(chunks, index, strict=True)), self.req.dv)

    def _query_block(self, index, shape):
        """(out, lse) delayed for one (batch, head, query) block: pairs, then the merge tree."""
        req = self.req
        *bi, _, qi = index
        batch = tuple(_span(c, i) for c, i in zip(self.batch_chunks, bi, strict=True))
        n_keys = (
            req.lk if req.kv_lengths is None else req.kv_lengths[tuple(slice(*s) for s in batch)]
        )
        n_keys = np.broadcast_to(n_keys, tuple(b - a for a, b in batch))
        a, b = _span(self.q_chunks, qi)
        pairs = []
        for ki in range(len(self.k_chunks)):
            c, e = _span(self.k_chunks, ki)
            needed, inside = _band(req, n_keys, a, b, c, e)
            if needed:
                pairs.append((ki, c, e, inside))
        sink = self._sink(index, batch, shape)
        if not pairs and sink is None:
            return delayed(empty_block, nout=2, pure=True)(shape, req.out_dtype, req.dtype)
        # One pair and no sink: no merge, computed straight into the output dtype.
        single = len(pairs) == 1 and sink is None
        parts = [
            self._pair(index, batch, n_keys, a, ki, c, e, inside, single)
            for ki, c, e, inside in pairs
        ]
        if sink is not None:
            parts.append(sink)
        while len(parts) > self.split_every:
            parts = [
                delayed(merge_parts, nout=2, pure=True)(*parts[i : i + self.split_every])
                for i in range(0, len(parts), self.split_every)
            ]
        if single:
            return parts[0]
        return delayed(merge_parts, nout=2, pure=True)(*parts, out_dtype=req.out_dtype)

    def _sink(self, index, batch, shape):
        """The block's sink logits as one more merge part (out 0, lse = sink), or None: merged
        once per query row, whatever the number of key blocks."""
        if self.req.sinks is None:
            return None
        heads = _span(self.head_chunks, index[-2])
        entries = tuple(slice(*s) for s in batch) + (slice(*heads),)
        return delayed(sink_part, nout=2, pure=True)(shape, self.req.sinks[entries], self.req.dtype)

    def _pair(self, index, batch, n_keys, a, ki, c, e, inside, single):
        req = self.req
        *bi, hi, qi = index
        heads = _span(self.head_chunks, hi)
        q_index, kv_index = (*bi, hi, qi, 0), (*bi, hi, ki, 0)
        mask = None
        if self.mask is not None:  # block 0 along the axes it broadcasts over
            blocks = (*bi, hi, qi, ki)
            mask = self.mask[
                tuple(i if n != 1 else 0 for i, n in zip(blocks, self.mask_shape, strict=True))
            ]
        sel = tuple(slice(*s) for s in batch)
        lengths = None if req.kv_lengths is None else np.clip(n_keys - c, 0, e - c)
        alibi_index = (*sel, slice(*heads))
        alibi = None if req.alibi is None else req.alibi[alibi_index]
        # Query a sits at global key a + off_b; in the block, key c is local 0. One int when
        # every entry agrees (always, unless bottom-right with kv_lengths).
        diag = 0
        if self.positional:
            offsets = np.vectorize(req.offset, otypes=[np.int64])(n_keys) + a - c
            diag = int(offsets.flat[0]) if np.all(offsets == offsets.flat[0]) else offsets
        options = {
            **self.options,
            "causal": req.causal and not inside,
            "window": None if inside or req.window == (-1, -1) else req.window,
            "out_dtype": req.out_dtype if single else req.dtype,
            # In the block's coordinates: key c is its key 0 (the diagonal above likewise).
            "global_tokens": None if inside or req.globals is None else req.globals - c,
        }
        return delayed(attend_pair, nout=2, pure=True)(
            self.q[q_index],
            self.k[kv_index],
            self.v[kv_index],
            mask,
            lengths,
            alibi,
            diag,
            options,
        )


def _span(chunks: tuple[int, ...], i: int) -> tuple[int, int]:
    start = sum(chunks[:i])
    return start, start + chunks[i]


def _band(req: Request, n_keys: np.ndarray, a: int, b: int, c: int, e: int) -> tuple[bool, bool]:
    """Whether queries [a, b) keep any key of [c, e) in some batch entry (needed), and whether
    every row keeps every one of them in every entry (inside: no bounds to apply)."""
    if a == b or c == e or n_keys.size == 0:
        return False, False
    needed, inside = False, True
    for n in np.unique(n_keys):
        lo, hi = key_bounds(req, np.array([a, b - 1]), int(n))
        needed |= max(c, lo[0]) < min(e, hi[1])  # rows' ranges grow with i: first lo, last hi
        needed |= _globals_reach(req, int(n), a, b, c, e)
        inside &= lo[1] <= c and e <= hi[0]
    return bool(needed), bool(inside)


def _globals_reach(req: Request, n: int, a: int, b: int, c: int, e: int) -> bool:
    """Whether global tokens keep some pair of queries [a, b) and keys [c, e) (entries of n
    keys): a global key, or a global query, below the last query's cap."""
    positions = req.globals
    if positions is None:
        return False
    end = min(e, int(key_caps(req, np.array([b - 1]), n)[0]))
    off = req.offset(n)

    def any_in(lo: int, hi: int) -> bool:
        k = int(np.searchsorted(positions, lo))
        return k < len(positions) and int(positions[k]) < hi

    return c < end and (any_in(c, end) or any_in(a + off, b + off))
