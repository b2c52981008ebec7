"""Thin adapter from a validated ``Request`` to the compiled ``_core`` (GIL released inside).

Copies happen only where the kernel needs them, each at most once: an operand whose last axis
is not unit-stride, or whose data is misaligned, is copied to a contiguous array; an ``out``
whose last axis is not unit-stride is computed into a temporary and copied back.
"""

from __future__ import annotations

import numpy as np

from ._request import BF16, F32, HALF_DTYPES, Request

try:
    from . import _core
except ImportError as exc:  # the NumPy backend still works; info() reports why
    # None, not a module: every use checks `_core is None` first. Ignored rather than typed
    # Optional[ModuleType] so that calls stay checked against the signatures in _core.pyi.
    _core = None  # type: ignore[assignment]
    IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    IMPORT_ERROR = None


def available() -> bool:
    return _core is not None


def attention(req: Request) -> tuple[np.ndarray, np.ndarray | None]:
    require_core()
    q = _kernel_ready(req.q, unit_last=True)
    k = _kernel_ready(req.k, unit_last=True)
    v = _kernel_ready(req.v, unit_last=True)
    mask = None if req.mask is None else _kernel_ready(req.mask, unit_last=False)

    out = req.out
    if out is None or not _is_kernel_ready(out, unit_last=True):
        out = np.empty(req.out_shape, req.out_dtype)
    lse = np.empty(req.lse_shape, req.dtype) if req.return_lse else None
    _call_core(
        req, q, k, v, out, lse, mask, req.kv_lengths, req.alibi, req.additive_w, sinks=req.sinks
    )
    if req.out is not None and out is not req.out:
        req.out[...] = out
        out = req.out
    return out, lse


def attention_packed(
    req: Request,
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    alibi: np.ndarray | None,
    out: np.ndarray,
) -> np.ndarray | None:
    """Packed varlen sequences in one call: ``req`` holds q, k, v as ``(H, total, D)`` (no
    mask, kv_lengths or additive w), the offsets are validated int64 ``(B + 1,)``, ``alibi``
    ``(B, Hq)`` in the compute dtype or None, ``out`` ``(total_q, Hq, Dv)`` C-ordered.
    Returns lse ``(Hq, total_q)`` when ``req.return_lse``."""
    require_core()
    q, k, v = (_kernel_ready(x, unit_last=True) for x in (req.q, req.k, req.v))
    lse = np.empty(req.lse_shape, req.dtype) if req.return_lse else None
    _call_core(
        req,
        q,
        k,
        v,
        out.swapaxes(0, 1),
        lse,
        None,
        None,
        alibi,
        None,
        cu_seqlens_q,
        cu_seqlens_k,
        sinks=req.sinks,
    )
    return lse


def attention_backward(
    req: Request, dout: np.ndarray, out: np.ndarray, lse: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The native backward, with the NumPy one's contract (``_numpy_backward``): arrays in
    canonical shape, gradients returned in the dtypes of q, k, v (half ones rounded by the
    kernel as it writes them). Half inputs are converted to float32 here, once each (O(L D)
    against the kernel's O(Lq Lk D)); ``delta = rowsum(dout * out)`` is computed here too, in
    the compute dtype."""
    require_core()
    ct = req.dtype
    q, k, v, dout_c = (
        _kernel_ready(x.astype(ct, copy=False), unit_last=True) for x in (req.q, req.k, req.v, dout)
    )
    lse = _kernel_ready(lse, unit_last=False)
    delta = np.einsum("...i,...i->...", dout_c, out.astype(ct, copy=False))
    mask = None if req.mask is None else _kernel_ready(req.mask, unit_last=False)
    # Every element is written (0 for keys no query keeps): np.empty, not np.zeros, whose
    # fresh zero pages would fault on the kernel's first write on every call. Half gradients
    # of float32 compute are rounded by the kernel as it writes them (dQ from a float32
    # partial, dK and dV from its tiles' accumulators).
    dq, dk, dv = (
        np.empty(x.shape, x.dtype if ct == F32 and x.dtype in HALF_DTYPES else ct)
        for x in (req.q, req.k, req.v)
    )
    left, right = req.window
    _core.attention_backward(
        q,
        k,
        v,
        dout_c,
        lse,
        delta,
        dq,
        dk,
        dv,
        mask,
        req.kv_lengths,
        req.scale,
        req.causal,
        0 if req.align == "bottom_right" else 1,
        left,
        right,
        min(req.num_threads or 0, 2**31 - 1),
        req.softcap,
        req.alibi,
        req.diagonal,
        req.globals,
        bf16_inputs=all(x.dtype == BF16 for x in (req.q, req.k, req.v, dout)),
    )
    dtypes = (req.q.dtype, req.k.dtype, req.v.dtype)
    dq, dk, dv = (g.astype(t, copy=False) for g, t in zip((dq, dk, dv), dtypes, strict=True))
    return dq, dk, dv


def require_core() -> None:
    if _core is None:
        raise RuntimeError(
            f"backend='native': the cpuattn extension failed to import ({IMPORT_ERROR})"
        )


def _call_core(
    req: Request,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray | None,
    mask: np.ndarray | None,
    kv_lengths: np.ndarray | None,
    alibi: np.ndarray | None,
    additive_w: np.ndarray | None,
    cu_seqlens_q: np.ndarray | None = None,
    cu_seqlens_k: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
) -> None:
    """_core.attention with the request's scalar options in the binding's form."""
    left, right = req.window
    k_scale = None if req.k_scale is None else _kernel_ready(req.k_scale, unit_last=False)
    v_scale = None if req.v_scale is None else _kernel_ready(req.v_scale, unit_last=False)
    _core.attention(
        q,
        k,
        v,
        out,
        lse,
        mask,
        kv_lengths,
        req.scale,
        req.causal,
        0 if req.align == "bottom_right" else 1,
        left,
        right,
        min(req.num_threads or 0, 2**31 - 1),  # the binding takes a C int; it caps anyway
        req.softcap,
        alibi,
        additive_w,
        cu_seqlens_q,
        cu_seqlens_k,
        req.diagonal,
        sinks,
        k_scale,
        v_scale,
        req.globals,
    )


def _is_kernel_ready(x: np.ndarray, unit_last: bool) -> bool:
    flags = x.flags
    if flags.c_contiguous and flags.aligned:  # the common case, without looking at strides
        return True
    item = x.itemsize
    if x.size == 0:
        return True
    if not x.flags.aligned or any(s % item for s in x.strides):
        return False
    return not unit_last or x.shape[-1] <= 1 or x.strides[-1] == item


def _kernel_ready(x: np.ndarray, unit_last: bool) -> np.ndarray:
    # A copy, not ascontiguousarray: that returns a contiguous but misaligned array as it is.
    return x if _is_kernel_ready(x, unit_last) else x.copy(order="C")
