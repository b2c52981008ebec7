"""Attention over paged K/V caches (vLLM's and flash-attn's block tables), read in place."""

from __future__ import annotations

import numpy as np

from . import _native
from ._api import BACKENDS, _may_overlap_itself, _overlaps, _pick_backend, attention
from ._request import (
    F32,
    I8,
    MAX_LENGTH,
    Request,
    _per_head,
    build_request,
    check_choice,
    globals_for,
)
from ._varlen import _cu_seqlens


def attention_paged(
    q,
    k_cache,
    v_cache,
    block_table,
    kv_lengths,
    *,
    causal=True,
    window=None,
    diagonal=None,
    scale=None,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    cu_seqlens_q=None,
    return_lse=False,
    out=None,
    out_dtype=None,
    num_threads=None,
    backend="auto",
    global_tokens=None,
):
    """Attention of each sequence's queries to its keys in a paged cache.

    The cache holds fixed-size blocks of ``block_size`` positions, handed out to sequences on
    demand (vLLM's CPU backend, flash-attn's ``block_table``, continuous batching): key ``j``
    of sequence ``b`` is row ``j % block_size`` of block ``block_table[b, j // block_size]``.
    Blocks are read where they lie, never gathered into a contiguous copy, through the same
    tiles, split-KV and GQA sharing as :func:`attention` (see :doc:`guide/serving`).
    :class:`PagedKVCache` manages the blocks.

    Parameters
    ----------
    q : array ``(B, Hq, Lq, D)``, or ``(total_q, Hq, D)`` with ``cu_seqlens_q``
        Heads before positions: a ``(B, Lq, Hq, D)`` array goes in as ``q.swapaxes(1, 2)``
        (with ``Lq`` a multiple of ``Hkv`` the wrong order would not even raise).
        The new queries of each sequence: ``Lq = 1`` for decode, a chunk for prefill. With
        ``cu_seqlens_q`` (``B + 1`` offsets), sequence ``b``'s queries are rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``: some sequences decoding one token and
        others prefilling a chunk in one call. float32, float16 or bfloat16 (float64 with a
        float64 cache).
    k_cache, v_cache : arrays ``(num_blocks, block_size, Hkv, D)`` and ``(..., Dv)``
        One dtype: float32, float64, float16, bfloat16, or int8 with ``k_scale`` and
        ``v_scale``. ``Hq % Hkv == 0`` (GQA). Any ``block_size >= 1``; tiles of 64 keys lie in
        one block when it is a multiple of 64, else each tile's rows are read block by block.
        Their last axis must be unit-stride and their data aligned to the element size (a
        ``ValueError`` otherwise): a cache is read where it lies, never copied. Other strides
        are free; decode is fastest with each block's kv heads stored one after the other
        (:class:`PagedKVCache`'s memory: ``np.zeros((num_blocks, Hkv, block_size, D))
        .swapaxes(1, 2)``), where one head's positions of a block are one run.
    block_table : int array ``(B, max_blocks)``
        Each sequence's blocks in order; entries past a sequence's last block are never read
        (any value). Every entry its length reaches must be a block of the cache.
    kv_lengths : int array ``(B,)``
        Valid positions per sequence, in ``[0, max_blocks * block_size]``.
    causal : bool or "bottom_right"
        Bottom-right, against each sequence's cache: query ``i`` of ``Lq_b`` new ones sits at
        position ``kv_lengths[b] - Lq_b + i`` (the new tokens are already appended).
    window, diagonal, scale, softcap, return_lse, out, out_dtype, num_threads, backend
        As for :func:`attention`, per sequence; ``out`` shaped like the result.
    global_tokens : int or sorted 1-D int array, optional
        Global positions beside a window (:func:`attention`), the same for every sequence:
        ``global_tokens=4, window=(1023, 0)`` keeps StreamingLLM's 4 sink tokens and the
        last 1024 positions of each cache, and reads only their blocks.
    alibi_slopes, sinks : arrays ``(Hq,)`` or ``(B, Hq)``, optional
        As for :func:`attention`.
    k_scale, v_scale : float32 arrays ``(num_blocks, block_size, Hkv)``
        The int8 caches' scales (:func:`quantize_int8`), only with int8 caches; another dtype
        is a ``TypeError`` (a pool of scales is never converted per call). Like the cache's
        rows, they are read only for the positions below ``kv_lengths``: the rest may hold
        anything, NaN included.

    Returns
    -------
    out : ndarray ``(B, Hq, Lq, Dv)`` (``(total_q, Hq, Dv)`` packed), q's dtype or
        ``out_dtype``; ``(out, lse)`` with ``return_lse=True``, lse ``(B, Hq, Lq)`` (packed:
        ``(Hq, total_q)``, as :func:`attention_varlen`).

    Raises
    ------
    TypeError, ValueError
        As :func:`attention` does, naming the argument; a block table entry outside the
        cache for positions below ``kv_lengths`` is a ``ValueError``: never read out of
        bounds.

    Examples
    --------
    >>> import numpy as np, cpuattn
    >>> rng = np.random.default_rng(0)
    >>> k_cache = rng.standard_normal((8, 16, 2, 64), dtype=np.float32)  # 8 blocks of 16
    >>> v_cache = rng.standard_normal((8, 16, 2, 64), dtype=np.float32)
    >>> table = np.array([[3, 0, 5], [1, 7, 0]], np.int32)  # sequence 1 uses 2 blocks
    >>> lengths = np.array([40, 20])
    >>> q = rng.standard_normal((2, 8, 1, 64), dtype=np.float32)  # decode: 1 query each
    >>> cpuattn.attention_paged(q, k_cache, v_cache, table, lengths).shape
    (2, 8, 1, 64)
    """
    check_choice("backend", backend, BACKENDS)
    q, k_cache, v_cache = np.asarray(q), np.asarray(k_cache), np.asarray(v_cache)
    num_blocks, block_size, hkv, d, dv = _cache_shape(k_cache, v_cache)
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(
            f"v_cache: dtype {v_cache.dtype} differs from k_cache's {k_cache.dtype}; the caches "
            "share one dtype"
        )
    table = _block_table(block_table)
    batch, max_blocks = table.shape
    if max_blocks * block_size > MAX_LENGTH:  # only zero-stride caches have such blocks
        raise ValueError(
            f"block_table: max_blocks x block_size = {max_blocks} x {block_size} must be at "
            "most 2**60"
        )
    lengths, longest = _lengths(kv_lengths, batch, max_blocks * block_size)
    native = _pick_backend(backend) is _native.attention
    if not native:  # the native binding checks the entries itself (see below)
        _check_blocks(table, lengths, block_size, num_blocks)
    given = table
    if table.dtype != np.int32:
        # Entries past a sequence's blocks may hold anything, so a wider table is cast, but a
        # value outside int32 would wrap, perhaps to a block of the cache: -1 instead, which
        # the binding refuses wherever a length reaches it.
        wide = (table < _INT32.min) | (table > _INT32.max)
        table = np.where(wide, -1, table) if wide.any() else table
    table = np.ascontiguousarray(table, dtype=np.int32)
    scales = (
        _cache_scale("k_scale", k_scale, "k_cache", k_cache),
        _cache_scale("v_scale", v_scale, "v_cache", v_cache),
    )

    packed = cu_seqlens_q is not None
    if packed:
        if q.ndim != 3:
            raise ValueError(f"q: expected (total_q, Hq, D) with cu_seqlens_q, got {q.shape}")
        cu_q = np.asarray(_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0]), np.int64)
        if len(cu_q) != batch + 1:
            raise ValueError(
                f"cu_seqlens_q: expected B + 1 = {batch + 1} offsets (block_table's B = "
                f"{batch}), got {len(cu_q)}"
            )
        q_view = q.swapaxes(0, 1)  # (Hq, total_q, D): one sequence to build_request
    else:
        if q.ndim != 4 or q.shape[0] != batch:
            raise ValueError(
                f"q: expected (B, Hq, Lq, D) with B = {batch} (block_table's rows), got {q.shape}"
            )
        q_view = q
    if q.shape[-1] != d:
        raise ValueError(f"q: expected head dim {d} (k_cache's last axis), got shape {q.shape}")
    kv_shape = (*q_view.shape[:-3], hkv, longest, d)
    req = _cache_named(
        build_request,
        q_view,
        _stand_in(kv_shape, k_cache.dtype),  # dtypes and heads only
        _stand_in((*kv_shape[:-1], dv), v_cache.dtype),
        causal=causal,
        window=window,
        scale=scale,
        num_threads=num_threads,
        out_dtype=out_dtype,
        softcap=softcap,
        diagonal=diagonal,
        return_lse=return_lse,
        global_tokens=global_tokens,
        **(
            {"k_scale": _stand_in(kv_shape[:-1], F32), "v_scale": _stand_in(kv_shape[:-1], F32)}
            if k_cache.dtype == I8
            else {}
        ),
    )
    if req.causal and req.align != "bottom_right":
        raise ValueError("causal: a paged cache aligns queries bottom-right (True), not top_left")
    alibi = _per_head("alibi_slopes", alibi_slopes, (batch,), req.hq, req.dtype, False)
    sink_logits = _per_head("sinks", sinks, (batch,), req.hq, req.dtype, False)
    out_shape = (q.shape[0], req.hq, dv) if packed else (batch, req.hq, req.lq, dv)
    result = _out(out, out_shape, req.out_dtype)
    # Into the caller's out only when the kernel can write it directly and it overlaps
    # nothing it reads (else computed aside, then copied, as NumPy would).
    in_place = result is not None and not (
        _overlaps(result, q, k_cache, v_cache, *scales, alibi, sink_logits)
        or _may_overlap_itself(result)
        or not _native._is_kernel_ready(result, unit_last=True)
    )
    target = result if in_place else np.empty(out_shape, req.out_dtype)
    lse_shape = (req.hq, q.shape[0]) if packed else (batch, req.hq, req.lq)
    lse = np.empty(lse_shape, req.dtype) if return_lse else None
    cu_q = cu_q if packed else None

    if native:
        _native.require_core()
        ready = _native._kernel_ready
        left, right = req.window
        # The binding checks every block a length reaches (in its own copy of the table, so no
        # other thread can change it after the check) but does not say which: on its error,
        # _bad_block names the entry (checking here first as well cost ~20 us a call).
        try:
            _native._core.attention_paged(
                ready(q_view, unit_last=True),
                k_cache,
                v_cache,
                table,
                lengths,
                target.swapaxes(0, 1) if packed else target,
                lse,
                req.scale,
                req.causal,
                left,
                right,
                min(req.num_threads or 0, 2**31 - 1),
                req.softcap,
                alibi,
                sink_logits,
                *(None if s is None else ready(s, unit_last=False) for s in scales),
                cu_q,
                req.diagonal,
                req.globals,
            )
        except ValueError:
            message = _bad_block(given, lengths, block_size, num_blocks)
            if message is None:
                raise
            raise ValueError(message) from None
    else:
        per_seq = {"alibi": alibi, "sinks": sink_logits, "window": window}
        _numpy_paged(req, q, k_cache, v_cache, table, lengths, scales, cu_q, per_seq, target, lse)
    if result is not None and target is not result:
        result[...] = target
    final = target if result is None else result
    return (final, lse) if return_lse else final


def _numpy_paged(
    req: Request, q, k_cache, v_cache, table, lengths, scales, cu_q, per_seq, out, lse
) -> None:
    """The NumPy backend: each sequence's blocks gathered (a copy: this is the reference the
    native backend is tested against), then :func:`attention` on NumPy, one sequence at a
    time."""
    block_size = k_cache.shape[1]
    for b in range(len(lengths)):
        n = int(lengths[b])
        blocks = table[b, : -(-n // block_size)]

        def gather(x, n=n, blocks=blocks):  # (blocks, block_size, Hkv, ...) -> (Hkv, n, ...)
            # The row count spelled out: -1 cannot be resolved for an empty array (D = 0).
            rows = x[blocks].reshape(len(blocks) * x.shape[1], *x.shape[2:])[:n]
            return np.moveaxis(rows, 0, 1)

        k_scale, v_scale = (None if s is None else gather(s) for s in scales)
        if cu_q is None:
            q_b, out_b = q[b], out[b]
        else:
            q_b, out_b = (
                q[cu_q[b] : cu_q[b + 1]].swapaxes(0, 1),
                out[cu_q[b] : cu_q[b + 1]].swapaxes(0, 1),
            )
        positions = globals_for(req.globals, q_b.shape[-2], n, req.diagonal)
        result = attention(
            q_b,
            gather(k_cache),
            gather(v_cache),
            causal=req.causal,
            window=per_seq["window"],
            diagonal=req.diagonal,
            scale=req.scale,
            softcap=req.softcap or None,
            alibi_slopes=None if per_seq["alibi"] is None else per_seq["alibi"][b],
            sinks=None if per_seq["sinks"] is None else per_seq["sinks"][b],
            k_scale=k_scale,
            v_scale=v_scale,
            global_tokens=positions,
            return_lse=lse is not None,
            out=out_b,
            out_dtype=req.out_dtype,
            backend="numpy",
        )
        if lse is not None:
            if cu_q is None:
                lse[b] = result[1]
            else:
                lse[:, cu_q[b] : cu_q[b + 1]] = result[1]


def _cache_named(build, *args, **kwargs) -> Request:
    """build_request, its errors naming the caches as this function's caller knows them."""
    try:
        return build(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for name in ("k", "v"):
            if message.startswith(f"{name}: "):
                message = f"{name}_cache: " + message[len(name) + 2 :]
        raise type(exc)(message) from None


def _cache_shape(k_cache: np.ndarray, v_cache: np.ndarray) -> tuple[int, int, int, int, int]:
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            raise ValueError(
                f"{name}: expected (num_blocks, block_size, Hkv, D), got shape {x.shape}"
            )
        if not _native._is_kernel_ready(x, unit_last=True):
            raise ValueError(
                f"{name}: expected its last axis unit-stride and its data aligned: a paged "
                "cache is read where it lies, never copied"
            )
    num_blocks, block_size, hkv, d = k_cache.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"v_cache: expected ({num_blocks}, {block_size}, {hkv}, Dv) like k_cache, "
            f"got {v_cache.shape}"
        )
    if block_size < 1:
        raise ValueError("k_cache: block_size (axis 1) must be >= 1")
    if num_blocks > np.iinfo(np.int32).max:
        raise ValueError("k_cache: block ids must fit in int32 (num_blocks < 2**31)")
    return num_blocks, block_size, hkv, d, v_cache.shape[3]


def _block_table(block_table) -> np.ndarray:
    table = np.asarray(block_table)
    if table.dtype.kind not in "iu":
        raise TypeError(f"block_table: expected integers, got dtype {table.dtype}")
    if table.ndim != 2:
        raise ValueError(f"block_table: expected (B, max_blocks), got shape {table.shape}")
    return table


def _lengths(kv_lengths, batch: int, capacity: int) -> tuple[np.ndarray, int]:
    """kv_lengths as int64, and the longest."""
    lengths = np.asarray(kv_lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"kv_lengths: expected integers, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(
            f"kv_lengths: expected shape (B,) = ({batch},) (block_table's rows), got {lengths.shape}"
        )
    low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 0)
    if low < 0 or high > capacity:
        raise ValueError(
            f"kv_lengths: values must lie in [0, max_blocks * block_size] = [0, {capacity}], "
            f"got min {low}, max {high}"
        )
    return np.ascontiguousarray(lengths, dtype=np.int64), high


_INT32 = np.iinfo(np.int32)
# Zero bytes for one element of any dtype the caches may have, viewed with zero strides.
_ZERO = np.zeros(16, np.uint8)


def _stand_in(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A read-only array of zeros with this shape and dtype, without memory of that size:
    build_request reads only the shapes and dtypes of k and v here (one ndarray call, ~1 us;
    np.broadcast_to took ~12 us, a tenth of a small decode call). A dtype the zero bytes
    cannot hold (objects, wider than 16 bytes: build_request refuses both, naming the
    cache) goes the slow way."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.itemsize > _ZERO.size:
        return np.broadcast_to(np.zeros((), dtype), shape)
    arr = np.ndarray(shape, dtype, buffer=_ZERO, strides=(0,) * len(shape))
    arr.flags.writeable = False
    return arr


def _check_blocks(table: np.ndarray, lengths: np.ndarray, block_size: int, num_blocks: int) -> None:
    """Every block a sequence's length reaches is one of the cache's."""
    message = _bad_block(table, lengths, block_size, num_blocks)
    if message is not None:
        raise ValueError(message)


def _bad_block(
    table: np.ndarray, lengths: np.ndarray, block_size: int, num_blocks: int
) -> str | None:
    """The error for the first entry a length reaches that is not a block of the cache, or
    None."""
    used = np.arange(table.shape[1]) < -(-lengths[:, None] // block_size)
    bad = used & ((table < 0) | (table >= num_blocks))
    if not bad.any():
        return None
    b, i = (int(x) for x in np.argwhere(bad)[0])
    return (
        f"block_table: entry [{b}, {i}] = {table[b, i]} is not a block of the cache "
        f"(0 <= id < {num_blocks}), and sequence {b}'s kv_lengths {lengths[b]} reaches it"
    )


def _cache_scale(name: str, scale, cache_name: str, cache: np.ndarray) -> np.ndarray | None:
    """An int8 cache's scales (required with it, refused without), float32."""
    if cache.dtype == I8 and scale is None:
        raise TypeError(
            f"{cache_name}: an int8 cache needs {name} (float32, (num_blocks, block_size, Hkv)),"
            " as PagedKVCache holds and cpuattn.quantize_int8 returns"
        )
    if scale is None:
        return None
    if cache.dtype != I8:
        raise TypeError(f"{name}: given for a {cache.dtype} {cache_name}; scales go with int8 only")
    scale = np.asarray(scale)
    if scale.dtype != F32:  # a pool's worth: never converted (or scanned) per call
        raise TypeError(f"{name}: expected float32 scales, got dtype {scale.dtype}")
    want = cache.shape[:3]
    if scale.shape != want:
        raise ValueError(
            f"{name}: expected (num_blocks, block_size, Hkv) = {want}, got {scale.shape}"
        )
    return scale


def _out(out, shape, dtype) -> np.ndarray | None:
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype} (q's dtype, or out_dtype), got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"out: expected shape {shape}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError("out: array is read-only")
    return out
