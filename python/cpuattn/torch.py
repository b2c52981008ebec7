"""PyTorch bridge: cpuattn's kernels as torch custom ops, with autograd and torch.compile::

    import torch, cpuattn.torch
    q = k = v = torch.randn(2, 8, 128, 64, requires_grad=True)
    out = cpuattn.torch.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()                          # gradients from cpuattn.attention_backward

:func:`scaled_dot_product_attention` has ``torch.nn.functional.scaled_dot_product_attention``'s
semantics; :func:`attention` takes every option of :func:`cpuattn.attention`. Both run the
``cpuattn::attention`` custom op (``torch.library``): its fake implementation lets
``torch.compile(fullgraph=True)`` trace it without a graph break, and its autograd formula is
``cpuattn::attention_backward``. CPU tensors of float32, float64, float16 and bfloat16 are
handed to the kernels as NumPy views of their memory: no copy when the last dimension is
contiguous. torch is imported here only: ``import cpuattn`` never needs it.
:func:`register_transformers` makes ``attn_implementation="cpuattn"`` available to Hugging
Face transformers models. See :doc:`guide/torch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _api, _backward
from ._request import BF16, _causal_mode, _global_tokens, _window, global_positions

__all__ = ["attention", "register_transformers", "scaled_dot_product_attention"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _numpy(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (bfloat16 through its bits; a negated or
    conjugated view materialized first)."""
    # Each of these makes a new tensor object (~1 us): only when it changes something, which
    # numpy() tells by raising (a tensor that requires grad, a negated or conjugated view).
    if t.dtype == torch.bfloat16:  # view() refuses a negated view: resolved first
        t = t.detach().resolve_neg() if t.requires_grad or t.is_neg() else t
        return _numpy(t.view(torch.int16)).view(BF16)
    try:
        return t.numpy()
    except RuntimeError:
        return t.detach().resolve_neg().resolve_conj().numpy()


def _tensor(a: np.ndarray) -> Tensor:
    """A tensor sharing an array's memory (bfloat16 through its bits)."""
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _optional(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else _numpy(t)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _keywords(causal, window_left, window_right, diagonal, scale, kv_lengths, softcap, alibi):
    return {
        "causal": False if causal == "none" else causal,
        "window": None if window_left == window_right == -1 else (window_left, window_right),
        "diagonal": diagonal,
        "scale": scale,
        "kv_lengths": _optional(kv_lengths),
        "softcap": softcap,
        "alibi_slopes": _optional(alibi),
    }


@torch.library.custom_op("cpuattn::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: str,
    window_left: int,
    window_right: int,
    diagonal: int | None,
    scale: float | None,
    kv_lengths: Tensor | None,
    softcap: float | None,
    alibi: Tensor | None,
    sinks: Tensor | None,
    global_tokens: Tensor | None = None,
    global_count: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of cpuattn.attention on the tensors' memory."""
    options = _keywords(
        causal, window_left, window_right, diagonal, scale, kv_lengths, softcap, alibi
    )
    out, lse = _api.attention(
        _numpy(q),
        _numpy(k),
        _numpy(v),
        mask=_optional(mask),
        sinks=_optional(sinks),
        global_tokens=_global_arg(global_tokens, global_count),
        return_lse=True,
        **options,
    )
    return _tensor(out), _tensor(lse)


@_attention_op.register_fake
def _attention_fake(q, k, v, mask, causal, window_left, window_right, diagonal, scale, *rest):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


@torch.library.custom_op("cpuattn::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    causal: str,
    window_left: int,
    window_right: int,
    diagonal: int | None,
    scale: float | None,
    kv_lengths: Tensor | None,
    softcap: float | None,
    alibi: Tensor | None,
    global_tokens: Tensor | None = None,
    global_count: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of cpuattn.attention_backward on the tensors' memory."""
    options = _keywords(
        causal, window_left, window_right, diagonal, scale, kv_lengths, softcap, alibi
    )
    grads = _backward.attention_backward(
        *(_numpy(t) for t in (dout, q, k, v, out, lse)),
        mask=_optional(mask),
        global_tokens=_global_arg(global_tokens, global_count),
        **options,
    )
    return tuple(_tensor(g) for g in grads)  # type: ignore[return-value]


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, *options, sinks, global_tokens, global_count = inputs
    out, lse = output
    ctx.sinks_input = len(inputs) - 3  # its needs_input_grad entry
    # options[5], options[7]: kv_lengths, alibi
    ctx.save_for_backward(q, k, v, out, lse, mask, options[5], options[7], sinks, global_tokens)
    ctx.options = options
    ctx.global_count = global_count
    ctx.mark_non_differentiable(lse)


def _attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse, mask, kv_lengths, alibi, sinks, global_tokens = ctx.saved_tensors
    causal, left, right, diagonal, scale, _, softcap, _ = ctx.options
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.cpuattn.attention_backward(
        dout, q, k, v, out, lse, mask, causal, left, right, diagonal, scale, kv_lengths, softcap,
        alibi, global_tokens, ctx.global_count,
    )  # fmt: skip
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[ctx.sinks_input]:
        # The sink's weight in row i is e^(sink - lse_i), and dO_i . O_i its rate:
        # d sink = -sum_i e^(sink - lse_i) (dO_i . O_i), over every row of the head.
        delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        per_row = torch.exp(sinks.to(lse.dtype)[..., None] - lse) * delta  # (*batch, Hq, Lq)
        dsinks = (-per_row.sum(-1)).sum_to_size(sinks.shape).to(sinks.dtype)
    return dq, dk, dv, *([None] * 9), dsinks, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_setup_context)


def _plain_eager(*tensors: Tensor | None) -> bool:
    """Whether these are plain tensors in plain eager code: no gradient to track, nothing
    recording or transforming the call (torch.compile, jit.trace, make_fx and other dispatch
    modes, forward AD, vmap / jvp wrappers, autocast)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.is_autocast_enabled("cpu"):
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or _forward_ad._current_level >= 0:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:  # vmap, grad, jvp
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    grad = torch.is_grad_enabled()
    for t in tensors:  # one loop, no generators: this runs on every decode step
        if t is not None and (type(t) is not Tensor or wrapped(t) or (grad and t.requires_grad)):
            return False
    return True


def _call(
    q, k, v, mask, causal, left, right, diagonal, scale, kv_lengths, softcap, alibi, lse, sinks=None,
    global_tokens=None, global_count=None, heads_last=False,
):  # fmt: skip
    """The custom op, or in plain eager code with no gradient to track the kernel straight
    away: the op's dispatch (autograd wrapper, schema) costs ~0.1 ms a call, a tenth of a
    decode step's attention (measured, (1, 32, 1, 128) on 4096 keys). Anything that records,
    transforms or differentiates the call gets the op. Returns (out, lse or None).
    heads_last: the kernel straight away writes out in ``(*batch, Lq, Hq, Dv)`` memory
    (returned as its ``(*batch, Hq, Lq, Dv)`` view), which transformers' layers want: no copy
    after (a padded MiniLM batch, (32, 12, 128, 32): 1.07x)."""
    if _forward_ad._current_level >= 0 and any(
        _forward_ad.unpack_dual(t).tangent is not None for t in (q, k, v)
    ):
        raise NotImplementedError("cpuattn has no forward-mode AD formula (reverse mode only)")
    if not _plain_eager(q, k, v, mask, kv_lengths, alibi, sinks, global_tokens):
        args = (q, k, v, mask, causal, left, right, diagonal, scale, kv_lengths, softcap, alibi)
        return torch.ops.cpuattn.attention(*args, sinks, global_tokens, global_count)
    options = _keywords(causal, left, right, diagonal, scale, kv_lengths, softcap, alibi)
    arrays = [_numpy(t) for t in (q, k, v)]
    heads_last = heads_last and q.dim() >= 3 and q.shape[:-3] == k.shape[:-3] == v.shape[:-3]
    memory = None
    if heads_last:  # (*batch, Lq, Hq, Dv), written through its (*batch, Hq, Lq, Dv) view
        memory = q.new_empty((*q.shape[:-3], q.size(-2), q.size(-3), v.size(-1)))
    result = _api.attention(
        *arrays,
        mask=_optional(mask),
        sinks=_optional(sinks),
        global_tokens=_global_arg(global_tokens, global_count),
        return_lse=lse,
        out=None if memory is None else _numpy(memory).swapaxes(-2, -3),
        **options,
    )
    out = _tensor(result[0] if lse else result) if memory is None else memory.transpose(-2, -3)
    return (out, _tensor(result[1])) if lse else (out, None)


# Under autocast the op runs in bfloat16, its floating inputs cast (as torch's SDPA does):
# models' rotary code hands it float32 q and k beside a bfloat16 v.
torch.library.register_autocast("cpuattn::attention", "cpu", torch.bfloat16)


def _global_parts(global_tokens, diagonal) -> tuple[Tensor | None, int | None]:
    """``global_tokens`` as the op takes it: positions as an int64 tensor, or a count. A list
    or an array is checked as cpuattn.attention checks it; a tensor's values are checked when
    the op runs (torch.compile cannot read them while it traces, nor check a list)."""
    if global_tokens is None or isinstance(global_tokens, Tensor):
        return global_tokens, None
    if isinstance(global_tokens, int | np.integer) and not isinstance(global_tokens, bool):
        # A count past every position means all of them; int64 holds the op's argument.
        return None, min(int(global_tokens), 2**62)
    if torch.compiler.is_compiling():
        return torch.as_tensor(global_tokens), None
    if np.ndim(global_tokens) == 0:  # a float, a bool, a string: cpuattn's TypeError
        _global_tokens(global_tokens, (-1, -1), 0, 0, None)
    positions = global_positions(global_tokens, diagonal is not None)
    return torch.from_numpy(positions), None


def _global_arg(positions: Tensor | None, count: int | None):
    return count if count is not None else _optional(positions)


def _check_tensors(**tensors: Tensor | None) -> None:
    """CPU tensors; q, k and v of a supported dtype, the others with no gradient."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_cpu:  # (t.device.type costs 0.3 us a tensor, on every decode step)
            raise ValueError(f"{name}: cpuattn runs on CPU tensors, got one on {t.device}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
        if name in ("query", "key", "value", "q", "k", "v"):
            if t.dtype not in _DTYPES:
                raise TypeError(
                    f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}"
                )
        elif name == "sinks":  # differentiable
            if not t.is_floating_point():
                raise TypeError(f"sinks: expected a floating tensor, got {t.dtype}")
        elif t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: requires grad, but cpuattn gives no gradient for it")


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on cpuattn's kernels.

    The same arguments and semantics: ``query (..., Hq, Lq, E)``, ``key (..., Hkv, Lk, E)``,
    ``value (..., Hkv, Lk, Ev)`` CPU tensors of one dtype (float32, float64, float16 or
    bfloat16); ``attn_mask`` broadcastable to ``(..., Hq, Lq, Lk)``, bool (True = attend) or
    float (added to the scores); ``is_causal`` top-left (query ``i`` keeps keys ``j <= i``;
    with a mask too, both apply);
    ``scale`` default ``1 / sqrt(E)``; ``Hq != Hkv`` only with ``enable_gqa=True`` (K and V are
    read in place, never repeated). Differentiable in query, key and value.

    Differences: ``dropout_p`` must be 0 (a ``ValueError`` otherwise: cpuattn has no dropout);
    a query row that keeps no key gives 0 (torch's math backend gives NaN); half inputs are
    computed in float32; the output is contiguous ``(..., Hq, Lq, Ev)`` whatever query's
    layout; no double backward and no forward-mode AD (torch.func's grad and jacrev included).

    Examples
    --------
    >>> import torch, cpuattn.torch
    >>> q = torch.randn(2, 8, 64, 32, requires_grad=True)
    >>> kv = torch.randn(2, 2, 64, 32)                         # 2 kv heads: GQA
    >>> out = cpuattn.torch.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(
    ...     q, kv, kv, is_causal=True, enable_gqa=True)
    >>> bool(torch.allclose(out, ref, atol=1e-5))
    True
    >>> out.sum().backward()
    >>> q.grad.shape
    torch.Size([2, 8, 64, 32])
    """
    _check_tensors(query=query, key=key, value=value, attn_mask=attn_mask)
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: cpuattn has no dropout, expected 0.0, got {dropout_p}")
    if not torch.is_autocast_enabled("cpu"):  # autocast casts them to one dtype
        for name, t in (("key", key), ("value", value)):
            if t.dtype != query.dtype:
                raise TypeError(f"{name}: expected query's dtype {query.dtype}, got {t.dtype}")
    query, key, value = _broadcast(query, key, value, enable_gqa)
    causal = "top_left" if is_causal else "none"
    try:
        out, _ = _call(
            query, key, value, attn_mask, causal, -1, -1, None, scale, None, None, None, False
        )
    except (TypeError, ValueError) as exc:  # cpuattn's argument names as torch's
        message = str(exc)
        for ours, theirs in _SDPA_NAMES:
            if message.startswith(ours):
                raise type(exc)(theirs + message[len(ours) :]) from None
        raise
    return out


_SDPA_NAMES = (("q: ", "query: "), ("k: ", "key: "), ("v: ", "value: "), ("mask: ", "attn_mask: "))


def _broadcast(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool):
    """torch's batch broadcasting: inputs of fewer dims gain leading ones, and every dim before
    the last two broadcasts, as expanded views (stride 0, no copy), heads (dim -3) included;
    with enable_gqa, key's and value's heads may also divide query's (never the other way).
    Key and value heads that differ, neither of them 1, are refused: the kernels read them in
    pairs. Raises torch's errors, by name."""
    n = query.dim()
    if key.dim() != n or value.dim() != n:
        n = max(n, key.dim(), value.dim())
        if n >= 3:
            query, key, value = (t[(None,) * (n - t.dim())] for t in (query, key, value))
    if n < 3:
        return query, key, value
    hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
    if hk != hv and hk != 1 and hv != 1:  # one head broadcasts; other counts would need a copy
        raise ValueError(
            f"value: {hv} heads against key's {hk}: cpuattn reads key and value heads in "
            "pairs (equal counts, or one of them 1)"
        )
    hkv = max(hk, hv)
    gqa = enable_gqa and hkv > 0 and hq % hkv == 0
    if hkv != hq and hkv != 1 and not gqa and (hq != 1 or enable_gqa):
        also = f", or a divisor of {hq}" if enable_gqa else "; pass enable_gqa=True for GQA"
        raise ValueError(f"key: {hkv} heads, expected query's {hq} or 1{also} (as in torch)")
    # Sizes, not shape[:-3]: slicing a torch.Size costs 0.3 us (and torch.broadcast_shapes
    # ~0.1 ms) on every call.
    for i in range(n - 3):
        if not query.size(i) == key.size(i) == value.size(i):
            break
    else:
        if hk == hv and (hq != 1 or hkv <= 1):
            return query, key, value
    try:
        batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    except RuntimeError as exc:
        raise ValueError(f"query, key, value: batch dims do not broadcast ({exc})") from None
    heads = hkv if hq == 1 and not gqa else hq  # one query head broadcasts over key's
    return (
        query.expand(*batch, heads, *query.shape[-2:]),
        key.expand(*batch, hkv, *key.shape[-2:]),
        value.expand(*batch, hkv, *value.shape[-2:]),
    )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    diagonal: int | None = None,
    scale: float | None = None,
    kv_lengths: Tensor | None = None,
    softcap: float | None = None,
    alibi_slopes: Tensor | None = None,
    sinks: Tensor | None = None,
    return_lse: bool = False,
    global_tokens: int | Sequence[int] | np.ndarray | Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`cpuattn.attention` on CPU tensors, differentiable in ``q``, ``k`` and ``v``.

    The arguments and semantics of :func:`cpuattn.attention` (``causal=True`` is bottom-right
    there; ``kv_lengths`` an int tensor, ``alibi_slopes`` and ``sinks`` float tensors).
    Differentiable in ``q``, ``k``, ``v`` and ``sinks`` (gpt-oss's learned sink logits). With
    ``return_lse=True``, ``(out, lse)``: lse is in float32 (float64 for float64 inputs) and has
    no gradient. ``global_tokens`` (hybrid attention beside a window) is an int, or positions
    as a sequence, array or int64 tensor.

    Examples
    --------
    >>> import torch, cpuattn.torch
    >>> q = k = v = torch.randn(1, 4, 100, 16)
    >>> out, lse = cpuattn.torch.attention(
    ...     q, k, v, causal=True, window=(31, 0), sinks=torch.zeros(4), return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 100, 16]), torch.Size([1, 4, 100]))
    """
    return _attention(
        q, k, v, mask=mask, causal=causal, window=window, diagonal=diagonal, scale=scale,
        kv_lengths=kv_lengths, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
        return_lse=return_lse, global_tokens=global_tokens,
    )  # fmt: skip


def _attention(
    q, k, v, *, mask=None, causal=False, window=None, diagonal=None, scale=None, kv_lengths=None,
    softcap=None, alibi_slopes=None, sinks=None, return_lse=False, global_tokens=None,
    heads_last=False,
):  # fmt: skip
    """attention(), and with heads_last its out in (*batch, Lq, Hq, Dv) memory where the kernel
    writes it directly (_call)."""
    _check_tensors(
        q=q, k=k, v=v, mask=mask, kv_lengths=kv_lengths, alibi_slopes=alibi_slopes, sinks=sinks,
        global_tokens=global_tokens if isinstance(global_tokens, Tensor) else None,
    )  # fmt: skip
    causal_on, alignment = _causal_mode(causal)  # cpuattn's checks and errors
    # A side past any distance (> 2**62 >= Lq + Lk + |diagonal|) keeps what an unbounded side
    # keeps; as -1 it fits the op's int64 argument on every path.
    left, right = (-1 if side > 2**62 else side for side in _window(window))
    positions, count = _global_parts(global_tokens, diagonal)
    out, lse = _call(
        q, k, v, mask, alignment if causal_on else "none", left, right, diagonal, scale,
        kv_lengths, softcap, alibi_slopes, return_lse, sinks, positions, count, heads_last,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def register_transformers(name: str = "cpuattn") -> str:
    """Registers cpuattn with Hugging Face transformers as ``attn_implementation=name``: an
    attention function and its mask function (see :doc:`guide/torch`). Returns the name.

    Examples
    --------
    >>> import cpuattn.torch
    >>> cpuattn.torch.register_transformers()                 # doctest: +SKIP
    'cpuattn'
    >>> model.set_attn_implementation("cpuattn")              # doctest: +SKIP
    """
    from ._transformers import register

    return register(name)
