"""Packed variable-length batches (flash-attn's ``varlen`` convention) on top of ``attention``."""

from __future__ import annotations

import numpy as np

from . import _native
from ._api import BACKENDS, _pick_backend, attention
from ._backward import attention_backward, check_saved, pick_backward
from ._request import _alibi, build_request, check_choice, globals_for


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    causal=False,
    window=None,
    scale=None,
    softcap=None,
    alibi_slopes=None,
    return_lse=False,
    num_threads: int | None = None,
    backend="auto",
    sinks=None,
    global_tokens=None,
):
    """Attention over B sequences packed end to end, with no padding anywhere.

    Sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` against
    ``k/v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``; causal and window are aligned per sequence
    as in :func:`attention` (bottom-right unless ``causal="top_left"``).

    Parameters
    ----------
    q, k, v : arrays ``(total_q, Hq, D)``, ``(total_k, Hkv, D)``, ``(total_k, Hkv, Dv)``
        Dtypes as for :func:`attention`, any strides.
    cu_seqlens_q, cu_seqlens_k : int arrays of length ``B + 1``
        Offsets of the sequences: start at 0, non-decreasing, end at ``total_q`` /
        ``total_k``.
    alibi_slopes : array ``(Hq,)`` or ``(B, Hq)``, optional
        ALiBi slopes, per sequence when ``(B, Hq)``.
    sinks : array ``(Hq,)``, optional
        Sink logits (:func:`attention`), the same for every sequence.
    global_tokens : int or sorted 1-D int array, optional
        Global positions beside a window (:func:`attention`), the same for every sequence,
        in each sequence's own positions (an array in ``[0, max(total_q, total_k))``; entries
        past a sequence's length are not its tokens).
    causal, window, scale, softcap, return_lse, num_threads, backend
        As for :func:`attention`.

    Returns
    -------
    out : ndarray ``(total_q, Hq, Dv)``, or ``(out, lse)`` with ``return_lse=True``
        lse has shape ``(Hq, total_q)`` (flash-attn's layout).

    Notes
    -----
    The native backend runs all sequences in one call: its threads share one list of
    (sequence, kv head, query tile) items, longest sequences first, so very uneven lengths
    and very many short sequences keep every thread busy. The NumPy backend runs the
    sequences one after another.
    """
    check_choice("backend", backend, BACKENDS)
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    req, cu_q, cu_k, slopes = packed_request(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        num_threads=num_threads,
        return_lse=return_lse,
        sinks=sinks,
        global_tokens=global_tokens,
    )
    batch, hq = len(cu_q) - 1, req.hq
    out = np.empty((q.shape[0], hq, req.dv), req.out_dtype)
    if _pick_backend(backend) is _native.attention:
        lse = _native.attention_packed(
            req, np.asarray(cu_q, np.int64), np.asarray(cu_k, np.int64), slopes, out
        )
        return (out, lse) if return_lse else out

    lse = np.empty((hq, q.shape[0]), req.dtype) if return_lse else None
    for b in range(batch):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        result = attention(
            q[qs:qe].swapaxes(0, 1),
            k[ks:ke].swapaxes(0, 1),
            v[ks:ke].swapaxes(0, 1),
            causal=causal,
            window=window,
            scale=scale,
            softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[b],
            return_lse=return_lse,
            out=out[qs:qe].swapaxes(0, 1),
            num_threads=num_threads,
            backend=backend,
            sinks=req.sinks,
            global_tokens=globals_for(req.globals, qe - qs, ke - ks, None),
        )
        if lse is not None:
            lse[:, qs:qe] = result[1]
    return (out, lse) if return_lse else out


def attention_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    causal=False,
    window=None,
    scale=None,
    softcap=None,
    alibi_slopes=None,
    num_threads: int | None = None,
    backend="auto",
    global_tokens=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`attention_varlen` with respect to ``q``, ``k`` and ``v``.

    Parameters
    ----------
    dout, out : arrays ``(total_q, Hq, Dv)``
        The loss's gradient at the output, and the forward's output; q's dtype or the
        compute dtype, any strides.
    q, k, v, cu_seqlens_q, cu_seqlens_k
        The forward's inputs, as for :func:`attention_varlen`.
    lse : array ``(Hq, total_q)``
        The forward's lse (``return_lse=True``), in the compute dtype.
    causal, window, scale, softcap, alibi_slopes, num_threads, backend, global_tokens
        As for :func:`attention_backward`: the forward's values.

    Returns
    -------
    (dq, dk, dv) : ndarrays shaped and typed like ``q``, ``k``, ``v``
        Each sequence's gradients, computed as :func:`attention_backward` computes them,
        one sequence after another.

    Examples
    --------
    >>> import numpy as np, cpuattn
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 3, 8])                       # two sequences: 3 and 5 tokens
    >>> q, k, v = (rng.standard_normal((8, 2, 16)) for _ in range(3))
    >>> out, lse = cpuattn.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    >>> dout = rng.standard_normal(out.shape)
    >>> dq, dk, dv = cpuattn.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, causal=True)
    >>> dq.shape, dk.shape, dv.shape
    ((8, 2, 16), (8, 2, 16), (8, 2, 16))
    """
    check_choice("backend", backend, BACKENDS)
    pick_backward(backend)  # before any work: "native" without the extension raises here
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    options = {"causal": causal, "window": window, "scale": scale, "softcap": softcap}
    req, cu_q, cu_k, slopes = packed_request(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        alibi_slopes=alibi_slopes,
        global_tokens=global_tokens,
        **options,
    )
    out_shape = (q.shape[0], req.hq, req.dv)
    dout = check_saved("dout", dout, req, out_shape, "(total_q, Hq, Dv)")
    out = check_saved("out", out, req, out_shape, "(total_q, Hq, Dv)")
    lse = check_saved("lse", lse, req, (req.hq, q.shape[0]), "(Hq, total_q)")

    dq, dk, dv = np.zeros(q.shape, q.dtype), np.zeros(k.shape, k.dtype), np.zeros(v.shape, v.dtype)
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        grads = attention_backward(
            dout[qs:qe].swapaxes(0, 1),
            q[qs:qe].swapaxes(0, 1),
            k[ks:ke].swapaxes(0, 1),
            v[ks:ke].swapaxes(0, 1),
            out[qs:qe].swapaxes(0, 1),
            lse[:, qs:qe],
            alibi_slopes=None if slopes is None else slopes[b],
            num_threads=num_threads,
            backend=backend,
            global_tokens=globals_for(req.globals, qe - qs, ke - ks, None),
            **options,
        )
        for whole, part, (start, stop) in zip(
            (dq, dk, dv), grads, ((qs, qe), (ks, ke), (ks, ke)), strict=True
        ):
            whole[start:stop] = part.swapaxes(0, 1)
    return dq, dk, dv


def packed_request(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, **options):
    """Validates packed ``(total, H, D)`` arrays and their offsets once: ``(req, cu_q, cu_k,
    slopes)``, ``req`` seeing the packed arrays as one sequence (dtypes, heads, head dims and
    the keywords in ``options``), ``slopes`` ``(B, Hq)`` or None."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name}: expected (total, H, D) for varlen, got shape {x.shape}")
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q (B + 1), got {len(cu_k)}"
        )
    req = build_request(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), **options)
    slopes = _alibi(alibi_slopes, (len(cu_q) - 1,), req.hq, req.dtype, squeeze_head=False)
    return req, cu_q, cu_k, slopes


def _cu_seqlens(name: str, cu, total: int) -> list[int]:
    cu = np.asarray(cu)
    if cu.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer offsets, got dtype {cu.dtype}")
    if cu.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of B + 1 offsets, got shape {cu.shape}")
    if cu.size < 1 or cu[0] != 0 or cu[-1] != total:
        raise ValueError(
            f"{name}: expected offsets starting at 0 and ending at {total} "
            f"(the packed length), got {cu.tolist()[:8]}"
        )
    # Compared, not differenced: np.diff of unsigned offsets wraps and is never negative.
    if np.any(cu[1:] < cu[:-1]):
        raise ValueError(f"{name}: offsets must be non-decreasing")
    return [int(x) for x in cu]
