"""The public functions: attention, merge, info."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from . import _native, _numpy
from ._request import BF16, F32, HALF_DTYPES, build_request, check_choice
from ._version import __version__
from ._weights import attention_weights

BACKENDS = ("auto", "native", "numpy")


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
    out=None,
    num_threads=None,
    backend="auto",
    out_dtype=None,
    softcap=None,
    alibi_slopes=None,
    return_weights=False,
    diagonal=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    global_tokens=None,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Scaled dot-product (softmax) attention, tiled with an online softmax: O(tile) memory.

    ``out[..., h, i, :] = sum_j softmax_j(s[..., h, i, j]) * v[..., h // (Hq // Hkv), j, :]``
    with ``s[i, j] = scale * <q_i, k_j>`` (plus a float ``mask``), the softmax taken over the
    keys ``j`` that are kept (see below) only.

    Parameters
    ----------
    q : array, shape ``(*batch, Hq, Lq, D)``, or ``(Lq, D)`` for one head with no batch.
    k : array, shape ``(*batch, Hkv, Lk, D)`` (or ``(Lk, D)``).
    v : array, shape ``(*batch, Hkv, Lk, Dv)`` (or ``(Lk, Dv)``).
        One dtype for all three: float32, float64, float16 or ``ml_dtypes.bfloat16``; or a
        float32 ``q`` with float16/bfloat16 ``k`` and ``v`` (a half KV cache); or int8 ``k``
        and ``v`` with ``k_scale`` and ``v_scale`` (below) and any q but float64. Anything else
        (integer, complex, other mixes) is a ``TypeError``. Half inputs are computed in float32
        (scores, softmax, accumulation); max error against float64 on the same rounded
        inputs, tested up to L = 4096: 2e-3 x max|v| (float16 output), 1e-2 x max|v|
        (bfloat16 output), float32 accuracy with ``out_dtype=np.float32`` or a float32 ``q``
        (bfloat16 products on AMX / AVX512-BF16 then split q and the weights in hi + lo).
        ``*batch`` is any number of dims and must be equal for q, k and v. ``Hq % Hkv == 0``:
        query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA; ``Hkv == 1`` is MQA), and K/V
        are never repeated in memory. ``Lq != Lk`` and ``Dv != D`` are fine.
        Any strides work (e.g. a ``(B, L, H, D)`` buffer viewed with ``swapaxes(-2, -3)``).
        The native backend reads the arrays in place when their last axis is unit-stride and
        otherwise copies that operand once.
    mask : bool or float array broadcastable to ``(*batch, Hq, Lq, Lk)``, optional
        bool: ``True`` = attend. float (any float dtype, bfloat16 too): added to the scaled
        scores (``-inf`` drops a key); cast to the compute dtype (float32, or float64 for
        float64 inputs) as given, before broadcasting.
    causal : False, True, "bottom_right" or "top_left"
        Keep key ``j`` for query ``i`` only if ``j <= i + off``. ``"bottom_right"`` (= True):
        ``off = Lk_b - Lq``, the last query sees every valid key, as KV-cache decoding needs.
        ``"top_left"``: ``off = 0``, like ``torch``'s ``is_causal``. Equal when ``Lq == Lk``.
        With ``Lq > Lk`` bottom-right, the first ``Lq - Lk`` queries keep no key.
    window : (left, right), optional
        Local attention: keep ``i + off - left <= j <= i + off + right``; ``-1`` leaves that
        side unbounded. ``off`` as for causal (bottom-right unless ``causal="top_left"``).
        ``causal=True, window=(w - 1, 0)`` is a causal sliding window of ``w`` keys.
    global_tokens : int or sorted 1-D int array, optional
        Hybrid attention beside a ``window`` (Longformer / BigBird global tokens,
        StreamingLLM's attention sinks): positions that every query attends to and whose
        queries attend to every key. An int ``n`` is the first ``n`` positions; an array
        lists them (sorted, distinct, in ``[0, 2**61]``; with ``diagonal``, positions
        relative to this call's first key, in ``[-2**61, 2**61]``; positions past every key
        and query of the call name no token of it and are ignored). A pair
        ``(i, j)`` the window drops is kept when every other condition holds
        (``kv_lengths``, causal, the bool mask) and key ``j`` is global or query ``i``'s
        position ``i + off`` is. Without a window this changes nothing. Costs the window's
        tiles plus the tiles that hold global keys (and all keys for the queries at global
        positions): no ``Lq x Lk`` mask is built. See :doc:`guide/hybrid`.
    scale : float, optional
        Multiplies ``<q, k>``; default ``1 / sqrt(D)``. A temperature ``t`` is ``scale=1/t``.
    kv_lengths : int array of shape ``*batch``, optional
        Valid keys per batch entry, in ``[0, Lk]``: keys ``j >= kv_lengths[b]`` are never read
        (a padded KV cache). ``Lk_b`` in ``off`` above is this length.
    return_lse : bool
        Also return ``lse = log(sum_j exp(s[i, j]))`` over kept keys (natural log), shape
        ``(*batch, Hq, Lq)``, in the compute dtype (float32 for half inputs). Feed it to
        :func:`merge`.
    out : ndarray, optional
        Written in place and returned: shape ``(*batch, Hq, Lq, Dv)``, the output dtype,
        writable, any strides. May alias the inputs (then a temporary is used).
    num_threads : int, optional
        Threads for the native backend. A count is used as given up to 4x the CPUs
        (``os.cpu_count()``) and silently capped there: more only adds scratch memory and
        context switches, and a count tuned on a big machine must not fail on a small one.
        Default: ``OMP_NUM_THREADS``, else all cores, divided among the calls in flight from
        other Python threads (no oversubscription from a thread pool). Results are bitwise
        identical for any count. A build without OpenMP, and the NumPy backend, use one.
    backend : "auto", "native" or "numpy"
        "auto" uses the compiled kernel when it imported (see :func:`info`), else NumPy.
    out_dtype : dtype, optional
        The output's dtype: q's by default; ``np.float32`` for half inputs keeps the float32
        result unrounded.
    softcap : float, optional
        Gemma-2 / flash-attn logit soft-capping: each scaled score ``s`` becomes
        ``softcap * tanh(s / softcap)`` before the mask is added.
    alibi_slopes : array of shape ``(Hq,)`` or ``(*batch, Hq)``, optional
        ALiBi (Press et al. 2022): ``s -= slope[h] * |i + off - j|``, ``off`` as for causal
        (bottom-right unless ``causal="top_left"``), after softcap. Computed on the fly: no
        ``Lq x Lk`` bias is ever built.
    return_weights : bool
        Also return the softmax weights actually used, ``(*batch, Hq, Lq, Lk)`` in the compute
        dtype: 0 where a key is not kept, all 0 for a query that keeps none. For inspection and
        plots (:func:`cpuattn.plot.attention_heatmap`): this costs O(Lq x Lk) memory and
        recomputes the scores.
    diagonal : int, optional
        Places the queries on the keys: query ``i`` sits at key position ``i + diagonal``, the
        ``off`` of causal, window and ALiBi above, in place of ``Lk_b - Lq`` or ``0`` (so
        ``"bottom_right"`` / ``"top_left"`` then make no difference, and ``kv_lengths`` only
        bounds the keys). For a block of one long sequence: queries ``[a, b)`` against keys
        ``[c, e)`` of a call with ``Lq`` queries and ``Lk`` keys is
        ``attention(q[..., a:b, :], k[..., c:e, :], v[..., c:e, :], causal=True,
        diagonal=a - c + Lk - Lq)``, exactly that block of the whole call (merge the key
        blocks with :func:`merge`). ``|diagonal| <= 2**61``.
    sinks : array of shape ``(Hq,)`` or ``(*batch, Hq)``, optional
        Attention sinks as learned logits (gpt-oss; transformers' ``s_aux``): per head a logit
        in the softmax's denominator only, ``out_i = sum_j e^(s_ij) v_j / (sum_j e^(s_ij) +
        e^sink)``; ``lse`` includes it, so a query that keeps no key gets out 0 and
        ``lse = sink``. With :func:`merge`, give the sinks to one of the parts only.
    k_scale, v_scale : float32 arrays shaped like k and v without the last axis, optional
        For int8 ``k`` and ``v`` (an int8 KV cache, :func:`quantize_int8`), and only for them:
        key ``j``'s rows stand for ``k[..., j, :] * k_scale[..., j]`` and ``v[..., j, :] *
        v_scale[..., j]``. Computed in float32 (q float32, float16 or bfloat16): the result
        is float64 attention on those dequantized rows, to float32 accuracy. Other float
        dtypes of scales are converted (a copy per call). A scale is part of its key's row:
        NaN or inf there acts as in that row of k or v (see Notes), so scales past
        ``kv_lengths`` may hold anything. See :doc:`guide/serving`.

    Returns
    -------
    out : ndarray, or a tuple
        ``out``; ``(out, lse)`` with ``return_lse=True``; ``(out, weights)`` or
        ``(out, lse, weights)`` with ``return_weights=True``. ``out`` has shape
        ``(*batch, Hq, Lq, Dv)`` (``(Lq, Dv)`` for 2-D inputs) and q's dtype (or ``out_dtype``).

    Raises
    ------
    TypeError
        An argument of the wrong type: an array of an unsupported dtype (integer ``q``, a
        complex mask), a float or bool where an int belongs (``window=(3.0, 0)``,
        ``num_threads=True``), a non-number ``scale`` or ``softcap``, a non-string
        ``backend``.
    ValueError
        The right type with a wrong value: shapes that do not fit together, out-of-range
        numbers (``window=(-2, 0)``, ``num_threads=0``, a NaN ``scale``), an unknown
        ``causal`` or ``backend`` string.

    Every message starts with the argument's name. NumPy scalars and 0-d arrays are taken
    wherever a Python number is (``scale=np.float32(0.25)``, ``window=(np.int64(3), 0)``);
    bools are not numbers here. :class:`KVCache`, :class:`MultiHeadAttention` and
    :func:`merge` follow the same rule.

    Notes
    -----
    A query row that keeps no key (all masked, ``kv_lengths`` 0, outside the window) gives
    output 0 and lse ``-inf``, never NaN. Keys are kept only when every condition holds:
    ``j < Lk_b``, the bool mask, causal and window (or global tokens). Scores and sums
    accumulate in the compute dtype (float64 for float64 inputs, float32 for everything else,
    float16 and bfloat16 included) with a max-shifted softmax, so logits of any magnitude are
    safe.

    NaN and inf: a row's output depends only on its q row, its mask row and the K/V rows of
    the keys it keeps. A key it does not keep (bool mask False, float mask ``-inf``, causal,
    window, past ``kv_lengths``) never affects it, whatever its K and V hold. A NaN in what the
    row uses makes it NaN (a NaN in V: that column); other rows and heads are never touched.

    Examples
    --------
    >>> import numpy as np, cpuattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 128, 64), dtype=np.float32)   # (B, Hq, Lq, D)
    >>> kv = rng.standard_normal((2, 2, 128, 64), dtype=np.float32)  # 2 kv heads: GQA
    >>> out, lse = cpuattn.attention(q, kv, kv, causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((2, 8, 128, 64), (2, 8, 128))
    """
    check_choice("backend", backend, BACKENDS)
    req = build_request(
        q,
        k,
        v,
        mask=mask,
        causal=causal,
        window=window,
        scale=scale,
        kv_lengths=kv_lengths,
        return_lse=return_lse,
        out=out,
        num_threads=num_threads,
        out_dtype=out_dtype,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        diagonal=diagonal,
        sinks=sinks,
        k_scale=k_scale,
        v_scale=v_scale,
        global_tokens=global_tokens,
    )
    if return_weights:
        result = run_request(dataclasses.replace(req, return_lse=True), backend)
        lse = result[1][None] if req.squeeze_head else result[1]
        weights = attention_weights(req, lse)
        if req.squeeze_head:
            weights = weights[0]
        return (*result, weights) if return_lse else (result[0], weights)
    return run_request(req, backend)


def run_request(req, backend: str):
    """Runs a validated request on the chosen backend and shapes the result for the caller."""
    run = _pick_backend(backend)
    if req.out is not None and (
        _overlaps(req.out, req.q, req.k, req.v, req.mask, *_small_inputs(req))
        or _may_overlap_itself(req.out)
    ):
        # Writing in place would clobber inputs still to be read, or (an out whose elements
        # share memory, from as_strided) have threads race on the same bytes: compute aside,
        # then copy, as NumPy would.
        result, lse = run(dataclasses.replace(req, out=None))
        req.out[...] = result
        return req.finish(req.out, lse)
    return req.finish(*run(req))


def _small_inputs(req) -> tuple:
    """The per-row and per-head inputs a request may hold as the caller's own arrays."""
    return (req.k_scale, req.v_scale, req.alibi, req.sinks, req.kv_lengths, req.globals)


def _pick_backend(backend: str):
    if backend == "numpy" or (backend == "auto" and not _native.available()):
        return _numpy.attention
    return _native.attention


def _overlaps(out: np.ndarray, *inputs: np.ndarray | None) -> bool:
    return any(x is not None and np.may_share_memory(out, x) for x in inputs)


def _may_overlap_itself(a: np.ndarray) -> bool:
    """False when no two elements of `a` can share a byte: with axes ordered by |stride|, each
    stride clears the whole extent of the smaller ones (a sufficient test; exotic interleaved
    layouts it cannot prove disjoint are treated as overlapping)."""
    if a.size == 0:
        return False
    extent = a.itemsize
    for stride, n in sorted(
        (abs(st), n) for st, n in zip(a.strides, a.shape, strict=True) if n > 1
    ):
        if stride < extent:
            return True
        extent = stride * (n - 1) + extent
    return False


def merge(outs: Sequence, lses: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Combine attention results computed over disjoint sets of keys into the whole.

    For parts ``p`` with ``(out_p, lse_p)`` from ``attention(..., return_lse=True)`` over
    disjoint key sets (KV chunks, ring attention, other machines)::

        lse = logaddexp over p of lse_p
        out = sum over p of exp(lse_p - lse) * out_p

    which equals attention over the union of the keys. Parts whose lse is ``-inf`` (no kept
    key) contribute nothing; rows empty in every part stay ``0`` with lse ``-inf``. A row
    whose lse is NaN in some part comes out NaN, lse NaN.

    Parameters
    ----------
    outs : sequence of arrays of one shape ``(..., Lq, Dv)`` and one dtype
        float32, float64, float16 or ``ml_dtypes.bfloat16``: what :func:`attention` returns.
    lses : sequence of floating arrays of shape ``(..., Lq)``, one per part.

    Returns
    -------
    (out, lse)
        As :func:`attention` gives them: the sum is taken in float32 (float64 for float64
        parts); ``out`` comes back in the parts' dtype (half parts: rounded once, at the end)
        and ``lse`` in the compute dtype, float32 for float16 / bfloat16 parts.

    Examples
    --------
    >>> import numpy as np, cpuattn
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 4, 100, 16))
    >>> parts = [cpuattn.attention(q, k[:, :60], v[:, :60], return_lse=True),
    ...          cpuattn.attention(q, k[:, 60:], v[:, 60:], return_lse=True)]
    >>> out, lse = cpuattn.merge(*zip(*parts))
    >>> bool(np.allclose(out, cpuattn.attention(q, k, v)))
    True
    """
    outs = [np.asarray(o) for o in outs]
    lses = [np.asarray(x) for x in lses]
    if not outs or len(outs) != len(lses):
        raise ValueError(
            f"merge: expected equally many outs and lses (at least one), got "
            f"{len(outs)} and {len(lses)}"
        )
    shape, dtype = outs[0].shape, outs[0].dtype
    if not _is_float(dtype):
        raise TypeError(f"outs[0]: expected a floating array, got dtype {dtype}")
    if len(shape) < 1:
        raise ValueError("outs[0]: expected shape (..., Lq, Dv), got a 0-d array")
    for p, (o, x) in enumerate(zip(outs, lses, strict=True)):
        if o.dtype != dtype:
            raise TypeError(f"outs[{p}]: expected dtype {dtype} like outs[0], got {o.dtype}")
        if o.shape != shape:
            raise ValueError(f"outs[{p}]: expected shape {shape} like outs[0], got {o.shape}")
        if not _is_float(x.dtype):
            raise TypeError(f"lses[{p}]: expected a floating array, got dtype {x.dtype}")
        if x.shape != shape[:-1]:
            raise ValueError(
                f"lses[{p}]: expected a floating array of shape {shape[:-1]} "
                f"(outs' shape without Dv), got {x.shape}"
            )
    compute = F32 if dtype in HALF_DTYPES else dtype  # as attention: half parts sum in float32
    lse_parts = np.stack(lses).astype(compute, copy=False)
    with np.errstate(invalid="ignore"):  # a NaN part: its row is NaN (below), no warning
        lse = np.logaddexp.reduce(lse_parts, axis=0)
        # Where every part is empty the weights would be exp(-inf - -inf): use 0 instead.
        finite = np.isfinite(lse)
        weights = np.where(finite, np.exp(lse_parts - np.where(finite, lse, 0)), 0)
    out = np.zeros(shape, compute)
    for w, o in zip(weights, outs, strict=True):
        out += w[..., None] * o.astype(compute, copy=False)
    nan_rows = np.isnan(lse)
    if nan_rows.any():  # as attention: a NaN in what a row uses makes it NaN, never 0
        out[nan_rows] = np.nan
    return out.astype(dtype, copy=False), lse


def _is_float(dtype: np.dtype) -> bool:
    """A real floating dtype, bfloat16 included (its kind is 'V', not 'f')."""
    return dtype.kind == "f" or dtype == BF16


def info() -> dict:
    """What this installation runs: version, backends, ISA in use, threads.

    Keys: ``version``, ``native`` (bool: the compiled kernel imported), ``native_error`` (why
    not, else None), ``isa`` (kernel set in use, e.g. ``'avx512'``; ``CPUATTN_ISA`` forces a
    lower one), ``supported_isas``, ``openmp`` (built with OpenMP), ``max_threads`` (threads
    a call uses by default), ``backends`` (usable values of ``backend=``).
    """
    core = _native._core
    return {
        "version": __version__,
        "native": core is not None,
        "native_error": _native.IMPORT_ERROR,
        "isa": core.isa() if core else None,
        "supported_isas": list(core.supported_isas()) if core else [],
        "openmp": bool(core.openmp()) if core else False,
        "max_threads": int(core.max_threads()) if core else 1,
        "backends": ["auto", "native", "numpy"] if core else ["auto", "numpy"],
    }
