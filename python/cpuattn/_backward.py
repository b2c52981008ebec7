"""``attention_backward``: the gradients of ``attention``, through the forward's own request."""

from __future__ import annotations

import numpy as np

from . import _native, _numpy_backward
from ._api import BACKENDS
from ._request import Request, build_request, check_choice


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    *,
    mask=None,
    causal=False,
    window=None,
    diagonal=None,
    scale=None,
    kv_lengths=None,
    softcap=None,
    alibi_slopes=None,
    sinks=None,
    num_threads=None,
    backend="auto",
    global_tokens=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`attention` with respect to ``q``, ``k`` and ``v``.

    For a loss with gradient ``dout`` at the output, returns ``(dq, dk, dv)`` by
    FlashAttention-2's backward: the weights are recomputed from the saved ``lse`` one tile at
    a time (never an ``Lq x Lk`` array), ``delta = rowsum(dout * out)``, ``dv += P^T dout``,
    ``dP = dout v^T``, ``dS = P * (dP - delta)``, ``dq += scale dS k``,
    ``dk += scale dS^T q``. See :doc:`guide/training`.

    Parameters
    ----------
    dout : array shaped like ``out``
        The loss's gradient at the output, ``(*batch, Hq, Lq, Dv)`` (``(Lq, Dv)`` for 2-D
        inputs), in q's dtype or the compute dtype (float32 for half inputs); any strides.
    q, k, v : arrays
        The forward's inputs, as for :func:`attention`.
    out, lse : arrays
        What ``attention(q, k, v, return_lse=True, ...)`` returned for the same keywords:
        ``out`` like ``dout``; ``lse`` of shape ``(*batch, Hq, Lq)`` in the compute dtype
        (float64 for float64 inputs, float32 otherwise).
    mask, causal, window, diagonal, scale, kv_lengths, softcap, alibi_slopes, sinks, num_threads
        The forward's keywords, validated by the same rules (and errors) as in
        :func:`attention`. Pass the values the forward used. ``sinks`` enter through ``lse``
        (which includes them); no gradient is returned for them (:mod:`cpuattn.torch` gives
        one).
    backend : "auto", "native" or "numpy"
        "auto" uses the compiled kernel when it imported (see :func:`info`), else NumPy. Both
        compute the same thing; the native backward is tested against the NumPy one.
    global_tokens : int or sorted 1-D int array, optional
        The forward's global tokens (:func:`attention`): the tiles the forward skipped are
        skipped here too.

    Returns
    -------
    (dq, dk, dv) : ndarrays
        Shaped and typed like ``q``, ``k``, ``v`` (C-contiguous). GQA/MQA: ``dk`` and ``dv`` of
        a kv head sum over the query heads that read it. Half inputs: computed and accumulated
        in float32, each gradient rounded once at the end; but bfloat16 ``q``, ``k``, ``v``
        and ``dout`` on a CPU with AMX (D and Dv multiples of 32) or AVX512-BF16 (D and Dv
        even) multiply as bfloat16, with the weights and their gradient rounded to bfloat16
        for the products (as torch does; the Training guide gives the error).

    Raises
    ------
    TypeError, ValueError
        As :func:`attention`, plus ``dout``, ``out`` or ``lse`` of the wrong dtype or shape;
        every message starts with the argument's name.
    RuntimeError
        ``backend="native"`` where the extension failed to import.

    Notes
    -----
    A key that no query keeps gets ``dk = dv = 0``; a query row that keeps no key (its lse is
    ``-inf``) gets ``dq = 0``, never NaN. ``softcap`` is differentiated through
    ``c * tanh(s / c)``. A float ``mask``, ``alibi_slopes``, ``scale`` and ``softcap`` are
    constants here: no gradient is returned for them. Results are deterministic: the same
    inputs give the same bits, for any ``num_threads``.

    NaN and inf: as in the forward, a query and a key that are not kept (bool mask, ``-inf``
    float mask, causal, window, ``kv_lengths``) exchange nothing, whatever their q, K and V
    rows hold. A non-finite value in a kept pair makes the gradients it reaches non-finite.

    Examples
    --------
    >>> import numpy as np, cpuattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 4, 50, 16))
    >>> out, lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    >>> dout = rng.standard_normal(out.shape)      # the loss's gradient at out
    >>> dq, dk, dv = cpuattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    >>> dq.shape, dk.shape, dv.shape
    ((2, 4, 50, 16), (2, 4, 50, 16), (2, 4, 50, 16))
    """
    check_choice("backend", backend, BACKENDS)
    for name, x in (("k", k), ("v", v)):
        if getattr(x, "dtype", None) == np.int8:
            raise TypeError(
                f"{name}: int8 K/V caches are for inference; attention_backward takes "
                "float32, float64, float16 or bfloat16 k and v"
            )
    req = build_request(
        q,
        k,
        v,
        mask=mask,
        causal=causal,
        window=window,
        diagonal=diagonal,
        scale=scale,
        kv_lengths=kv_lengths,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        num_threads=num_threads,
        global_tokens=global_tokens,
    )
    layout = "(Lq, Dv)" if req.squeeze_head else "(*batch, Hq, Lq, Dv)"
    out_shape = _user_shape(req, req.out_shape)
    dout = check_saved("dout", dout, req, out_shape, layout)
    out = check_saved("out", out, req, out_shape, layout)
    lse_layout = "(Lq,)" if req.squeeze_head else "(*batch, Hq, Lq)"
    lse = check_saved("lse", lse, req, _user_shape(req, req.lse_shape), lse_layout)
    if req.squeeze_head:
        dout, out, lse = dout[None], out[None], lse[None]
    run = pick_backward(backend)
    dq, dk, dv = run(req, dout, out, lse)
    if req.squeeze_head:
        return dq[0], dk[0], dv[0]
    return dq, dk, dv


def pick_backward(backend: str):
    """The backward of a backend: ``"auto"`` is the native one when the extension imported;
    ``"native"`` without it raises RuntimeError here, before any work."""
    if backend == "numpy" or (backend == "auto" and not _native.available()):
        return _numpy_backward.attention_backward
    _native.require_core()
    return _native.attention_backward


def _user_shape(req: Request, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[1:] if req.squeeze_head else shape


def check_saved(name: str, x, req: Request, shape: tuple[int, ...], layout: str) -> np.ndarray:
    """``dout``, ``out`` or ``lse`` as an array of the expected shape and dtype: ``lse`` in the
    compute dtype (what the forward returns), ``dout`` and ``out`` in q's dtype or that one."""
    x = np.asarray(x)
    if name == "lse":
        allowed = {req.dtype: None}
        why = f"what attention(..., return_lse=True) returns for {req.q.dtype} inputs"
    else:
        allowed = dict.fromkeys((req.out_dtype, req.dtype))  # q's dtype first, no repeats
        why = "q's dtype or the compute dtype"
    if x.dtype not in allowed:
        names = " or ".join(str(t) for t in allowed)
        raise TypeError(f"{name}: expected dtype {names} ({why}), got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {layout} = {shape}, got {x.shape}")
    return x
