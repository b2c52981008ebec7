"""A paged KV cache for serving: fixed-size blocks from one pool, handed out as sequences grow."""

from __future__ import annotations

import heapq

import numpy as np

from ._paged import attention_paged
from ._quantize import _quantize, as_floats, dequantize_int8
from ._request import BF16, F32, F64, I8, SUPPORTED_DTYPES, as_int, checked_sizes

_INT32_MAX = int(np.iinfo(np.int32).max)
# The public arrays and the attributes holding their memory, heads first in a block.
_STORES = {
    "k_cache": "_k_store",
    "v_cache": "_v_store",
    "k_scale": "_k_scale_store",
    "v_scale": "_v_scale_store",
}


class PagedKVCache:
    """Keys and values of many sequences in ``num_blocks`` blocks of ``block_size`` positions.

    The vLLM / flash-attn paged layout: ``k_cache`` is
    ``(num_blocks, block_size, num_kv_heads, head_dim)`` and ``v_cache`` the same with
    ``value_dim``, allocated once. Their memory holds each block's heads one after the other
    (``(num_blocks, num_kv_heads, block_size, head_dim)``, as vLLM's CPU cache does), and
    the two arrays are views of it with the axes above: a kv head's positions of a block are
    then one run of memory, which decode reads at the speed of a contiguous cache, where
    blocks laid out as the axes say were read at 0.5-0.6x that on AMD Zen 4 (measured in the
    Serving guide). ``attention_paged`` takes either layout, any strides; the layout survives
    pickling. Being views, the arrays are written through by indexing them (as
    :meth:`append` does), but a reshape of one is a copy: write through the 4-D views, or
    swap the axes back (``cache.k_cache.swapaxes(1, 2)`` is the contiguous memory). A
    sequence holds a list of blocks, taken from a free list
    as it grows (lowest free id first, so the layout is deterministic) and given back by
    :meth:`free`; its position ``p`` lives in block ``block_table[p // block_size]`` at offset
    ``p % block_size``. Sequences of very different lengths thus share one pool without
    reserving ``max_len`` each.

    ``dtype`` is float32, float64, float16, bfloat16 or int8. With int8, ``k_scale`` and
    ``v_scale`` (float32, ``(num_blocks, block_size, num_kv_heads)``) hold one scale per
    position and head (:meth:`append` quantizes with :func:`quantize_int8`); otherwise they
    are None. Sizes are ints (a float or bool is a TypeError; a negative size, or a
    ``block_size`` of 0, a ValueError).

    Errors: an unknown sequence id (never added, or freed) is a ``ValueError``, like any
    other wrong value. Running out of blocks is a ``MemoryError``: the arguments are fine
    but the pool is full, and a scheduler can catch exactly that (free or preempt a
    sequence, retry) without also catching bad shapes. A failing :meth:`append` changes
    nothing.

    Examples
    --------
    >>> import numpy as np
    >>> from cpuattn._paged_cache import PagedKVCache
    >>> cache = PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16)
    >>> a, b = cache.add_sequence(), cache.add_sequence()
    >>> rng = np.random.default_rng(0)
    >>> cache.append([a, b], *rng.standard_normal((2, 2, 2, 6, 16)))   # prefill 6 positions
    >>> cache.append(b, *rng.standard_normal((2, 1, 2, 3, 16)))         # 3 more for b
    >>> cache.block_table([a, b])
    array([[0, 1, 0],
           [2, 3, 4]], dtype=int32)
    >>> cache.lengths([a, b])
    array([6, 9])
    >>> cache.free(a)
    >>> cache.num_free_blocks
    5

    Attend with ``out = cache.attend(q, [b], causal=True)``, ``q`` ``(1, Hq, Lq, 16)``: that is
    ``cpuattn.attention_paged`` on the blocks, with ``block_table([b])``, the scales and
    ``kv_lengths=lengths([b])``.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype=np.float32,
    ):
        sizes = checked_sizes(
            "PagedKVCache",
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            value_dim=head_dim if value_dim is None else value_dim,
        )
        if sizes["block_size"] == 0:
            raise ValueError("PagedKVCache: block_size must be >= 1, got 0")
        if sizes["num_blocks"] > _INT32_MAX:
            raise ValueError(
                f"PagedKVCache: num_blocks must fit the int32 block table, got "
                f"{sizes['num_blocks']}"
            )
        dtype = np.dtype(dtype)
        if dtype not in (*SUPPORTED_DTYPES, I8):
            raise TypeError(
                "PagedKVCache: dtype must be float32, float64, float16, bfloat16 or int8, "
                f"got {dtype}"
            )
        nb, bs, h = sizes["num_blocks"], sizes["block_size"], sizes["num_kv_heads"]
        # Stored heads first inside a block; the public arrays are (block, position, head)
        # views of it.
        self._k_store = np.zeros((nb, h, bs, sizes["head_dim"]), dtype)
        self._v_store = np.zeros((nb, h, bs, sizes["value_dim"]), dtype)
        self._k_scale_store = np.zeros((nb, h, bs), F32) if dtype == I8 else None
        self._v_scale_store = np.zeros((nb, h, bs), F32) if dtype == I8 else None
        self._free = list(range(nb))  # a min-heap: the lowest free block goes first
        self._blocks: dict[int, list[int]] = {}  # live sequence id -> its blocks, in order
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    def __setstate__(self, state: dict) -> None:
        # Caches pickled before the memory was heads first held the (block, position, head)
        # arrays themselves.
        for name, store in _STORES.items():
            if name in state:
                old = state.pop(name)
                state[store] = None if old is None else np.ascontiguousarray(old.swapaxes(1, 2))
        self.__dict__.update(state)

    @property
    def k_cache(self) -> np.ndarray:
        """Keys, ``(num_blocks, block_size, num_kv_heads, head_dim)``: a view of the cache's
        memory (each block's heads one after the other), written to by :meth:`append`."""
        return self._k_store.swapaxes(1, 2)

    @property
    def v_cache(self) -> np.ndarray:
        """Values, ``(num_blocks, block_size, num_kv_heads, value_dim)``, like ``k_cache``."""
        return self._v_store.swapaxes(1, 2)

    @property
    def k_scale(self) -> np.ndarray | None:
        """int8 caches: the keys' scales, float32 ``(num_blocks, block_size, num_kv_heads)``
        (a view, like ``k_cache``); None otherwise."""
        return _scales_by_position(self._k_scale_store)

    @property
    def v_scale(self) -> np.ndarray | None:
        """int8 caches: the values' scales, like ``k_scale``; None otherwise."""
        return _scales_by_position(self._v_scale_store)

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[0]

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def add_sequence(self) -> int:
        """A new, empty sequence; its id is never reused (it takes no block until appended to)."""
        seq = self._next_id
        self._next_id += 1
        self._blocks[seq] = []
        self._lengths[seq] = 0
        return seq

    def free(self, seq) -> None:
        """Gives the sequence's blocks back to the pool; ``seq`` is unknown afterwards."""
        seq = self._ids("PagedKVCache.free: seq", seq, scalar_only=True)[0]
        for block in self._blocks.pop(seq):
            heapq.heappush(self._free, block)
        del self._lengths[seq]

    def lengths(self, seqs) -> np.ndarray:
        """The sequences' lengths: int64 ``(n,)`` (``(1,)`` for one int id)."""
        ids = self._ids("PagedKVCache.lengths: seqs", seqs)
        return np.array([self._lengths[s] for s in ids], np.int64)

    def block_table(self, seqs) -> np.ndarray:
        """int32 ``(n, max_blocks)`` (n = 1 for one int id): row i lists sequence i's blocks
        in order, padded with 0.

        ``max_blocks`` is the most blocks any of these sequences holds (at least 1). The
        padding is never read: ``lengths(seqs)`` bounds the positions attention reads.
        """
        ids = self._ids("PagedKVCache.block_table: seqs", seqs)
        width = max([1] + [len(self._blocks[s]) for s in ids])
        table = np.zeros((len(ids), width), np.int32)
        for row, s in zip(table, ids, strict=True):
            row[: len(self._blocks[s])] = self._blocks[s]
        return table

    def append(self, seqs, k, v) -> None:
        """Writes ``T`` new positions after each sequence's current ones.

        ``seqs``: one int id (then n = 1) or n distinct live ids (a list or 1-D int array).
        ``k``: ``(n, num_kv_heads, T, head_dim)``, ``v``: ``(n, num_kv_heads, T, value_dim)``
        (``KVCache.append``'s layout), any strides, real numbers cast to the cache dtype
        (quantized for int8). Blocks are taken as needed. Everything is checked before
        anything is written, so a failing append changes nothing: TypeError for ids that are
        not ints or k, v that are not real numbers; ValueError for unknown or repeated ids,
        wrong shapes, or (int8) non-finite values; MemoryError if the free blocks do not
        cover all n sequences.
        """
        ids = self._ids("PagedKVCache.append: seqs", seqs)
        if len(set(ids)) != len(ids):
            raise ValueError(f"PagedKVCache.append: seqs: expected distinct ids, got {ids}")
        k, v = np.asarray(k), np.asarray(v)
        for name, x in (("k", k), ("v", v)):
            if x.dtype.kind not in "fiu" and x.dtype != BF16:
                raise TypeError(
                    f"PagedKVCache.append: {name}: expected real numbers (cast to the cache's "
                    f"{self.k_cache.dtype}), got dtype {x.dtype}"
                )
        n, (h, d), dv = len(ids), self.k_cache.shape[2:], self.v_cache.shape[3]
        if k.ndim != 4 or k.shape[:2] != (n, h) or k.shape[3] != d:
            raise ValueError(
                f"PagedKVCache.append: k must have shape ({n}, {h}, T, {d}) for {n} "
                f"sequence(s), got {k.shape}"
            )
        t = k.shape[2]
        if v.shape != (n, h, t, dv):
            raise ValueError(
                f"PagedKVCache.append: v must have shape ({n}, {h}, {t}, {dv}) like k, "
                f"got {v.shape}"
            )
        bs = self.block_size
        more = [-(-(self._lengths[s] + t) // bs) - len(self._blocks[s]) for s in ids]
        if sum(more) > len(self._free):
            raise MemoryError(
                f"PagedKVCache.append: {t} new positions for {n} sequence(s) need {sum(more)} "
                f"more blocks, {len(self._free)} of {self.num_blocks} are free "
                f"(block_size {bs}); free a sequence or use a bigger cache"
            )
        # Cast (or quantize) first: a cast that fails or warns leaves the cache as it was.
        if self.k_scale is not None and self.v_scale is not None:
            k, k_scale = _quantize("PagedKVCache.append: k", as_floats(k))
            v, v_scale = _quantize("PagedKVCache.append: v", as_floats(v))
            writes = [(self.k_cache, k), (self.v_cache, v)]
            writes += [(self.k_scale, k_scale), (self.v_scale, v_scale)]
        else:
            writes = [(self.k_cache, k.astype(self.k_cache.dtype, copy=False))]
            writes += [(self.v_cache, v.astype(self.v_cache.dtype, copy=False))]
        for i, (s, m) in enumerate(zip(ids, more, strict=True)):
            self._blocks[s] += [heapq.heappop(self._free) for _ in range(m)]
            where = self._where(s, self._lengths[s], self._lengths[s] + t)
            for dst, new in writes:
                dst[where] = new[i].swapaxes(0, 1)  # (H, T, ...) -> (T, H, ...)
            self._lengths[s] += t

    def gather(self, seq) -> tuple[np.ndarray, np.ndarray]:
        """The sequence's keys and values, contiguous ``(num_kv_heads, length, head_dim)``
        and ``(..., value_dim)``: float32 (dequantized for int8, cast for half), float64 for
        a float64 cache. For tests and debugging: attention reads the blocks in place."""
        seq = self._ids("PagedKVCache.gather: seq", seq, scalar_only=True)[0]
        where = self._where(seq, 0, self._lengths[seq])
        dtype = F64 if self.k_cache.dtype == F64 else F32
        k, v = self.k_cache[where], self.v_cache[where]  # (L, H, D): copies
        if self.k_scale is not None and self.v_scale is not None:
            k = dequantize_int8(k, self.k_scale[where])
            v = dequantize_int8(v, self.v_scale[where])
        return (
            np.ascontiguousarray(k.swapaxes(0, 1), dtype),
            np.ascontiguousarray(v.swapaxes(0, 1), dtype),
        )

    def attend(self, q, seqs, **options):
        """``cpuattn.attention_paged`` of ``q`` ``(n, Hq, Lq, head_dim)`` over these sequences.

        Passes the caches, ``block_table(seqs)``, ``lengths(seqs)`` as ``kv_lengths`` and the
        int8 scales; ``options`` go through (``causal=True`` for decoding, ``window``,
        ``softcap``, ``out``, ``cu_seqlens_q`` with a packed ``q`` ``(total_q, Hq, head_dim)``,
        ...). Options the cache itself passes are a ``TypeError``.
        """
        owned = {"k_scale", "v_scale", "block_table", "kv_lengths"} & set(options)
        if owned:
            raise TypeError(
                f"PagedKVCache.attend: {', '.join(sorted(owned))}: the cache passes its own"
            )
        return attention_paged(
            q,
            self.k_cache,
            self.v_cache,
            self.block_table(seqs),
            self.lengths(seqs),
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            **options,
        )

    def _where(self, seq: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) index arrays of the sequence's positions ``start:stop``."""
        pos = np.arange(start, stop)
        blocks = np.array(self._blocks[seq], np.intp)
        return blocks[pos // self.block_size], pos % self.block_size

    def _ids(self, name: str, seqs, *, scalar_only: bool = False) -> list[int]:
        """``seqs`` (an int id, or a 1-D list / int array of them) as a list of live ids."""
        arr = np.asarray(seqs)
        if arr.ndim == 0 or scalar_only:
            ids = [as_int(name, seqs, "a sequence id (int)")]
        elif arr.dtype.kind not in "iu" and arr.size > 0:
            raise TypeError(
                f"{name}: expected a sequence id (int) or a 1-D list of them, got "
                f"{type(seqs).__name__} of dtype {arr.dtype}"
            )
        elif arr.ndim != 1:
            raise ValueError(
                f"{name}: expected a sequence id (int) or a 1-D list of them, got shape {arr.shape}"
            )
        else:
            ids = [int(s) for s in arr]
        for s in ids:
            if s not in self._blocks:
                raise ValueError(f"{name}: unknown sequence id {s} (never added, or freed)")
        return ids


def _scales_by_position(store: np.ndarray | None) -> np.ndarray | None:
    """A (block, head, position) store of scales viewed (block, position, head)."""
    return None if store is None else store.swapaxes(1, 2)
