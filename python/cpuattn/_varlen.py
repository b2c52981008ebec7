"""Packed variable-length batches (flash-attn's ``varlen`` convention) on top of ``attention``."""

from __future__ import annotations

import numpy as np

from . import _native
from ._api import BACKENDS, _pick_backend, attention
from ._request import _alibi, build_request, check_choice


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
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 3:
            raise ValueError(f"{name}: expected (total, H, D) for varlen, got shape {x.shape}")
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_k: expected {len(cu_q)} entries like cu_seqlens_q (B + 1), got {len(cu_k)}"
        )
    batch = len(cu_q) - 1
    hq = q.shape[1]

    # Validates dtypes, heads and head dims once, on the packed arrays seen as one sequence.
    req = build_request(
        q.swapaxes(0, 1),
        k.swapaxes(0, 1),
        v.swapaxes(0, 1),
        scale=scale,
        causal=causal,
        window=window,
        softcap=softcap,
        num_threads=num_threads,
        return_lse=return_lse,
    )
    slopes = _alibi(alibi_slopes, (batch,), hq, req.dtype, squeeze_head=False)  # (B, Hq)
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
        )
        if lse is not None:
            lse[:, qs:qe] = result[1]
    return (out, lse) if return_lse else out


def _cu_seqlens(name: str, cu, total: int) -> list[int]:
    cu = np.asarray(cu)
    if cu.dtype.kind not in "iu" or cu.ndim != 1:
        raise TypeError(
            f"{name}: expected a 1-D integer array (B + 1 offsets), "
            f"got dtype {cu.dtype}, shape {cu.shape}"
        )
    if cu.size < 1 or cu[0] != 0 or cu[-1] != total:
        raise ValueError(
            f"{name}: expected offsets starting at 0 and ending at {total} "
            f"(the packed length), got {cu.tolist()[:8]}"
        )
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"{name}: offsets must be non-decreasing")
    return [int(x) for x in cu]
