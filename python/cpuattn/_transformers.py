"""``attn_implementation="cpuattn"`` for Hugging Face transformers models
(:func:`cpuattn.torch.register_transformers`).

Two registrations: the attention function (``AttentionInterface``) and the mask function
(``AttentionMaskInterface``: without one, transformers passes no mask at all, padding
included). The mask is transformers' own ``sdpa_mask`` with one change: for a causal sliding
window of the config's ``sliding_window`` (checked on the mask function itself, so chunked,
bidirectional and mixed patterns keep their masks) it may skip the mask as for a full causal
layer (no padding), and the attention function applies the window from the
``sliding_window`` keyword the models pass: no ``Lq x Lk`` mask is built for it.
"""

from __future__ import annotations

import itertools
from typing import cast

import torch

from . import _api
from .torch import _attention, _numpy


def register(name: str) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask)
    return name


# Keywords some models pass that change the scores, which cpuattn does not take: an error,
# never a silently different result.
UNSUPPORTED = ("position_bias", "head_mask")


def mask(*args, local_size=None, config=None, **kwargs):
    """transformers' ``sdpa_mask`` (bool ``(B, 1, Lq, Lk)``, True = attend, or None where a
    causal or bidirectional call with no padding needs none), allowed to skip causal sliding
    windows too: attention_forward applies their window itself."""
    from transformers.masking_utils import sdpa_mask

    if local_size is not None and _causal_window(kwargs.get("mask_function"), local_size, config):
        local_size = None  # not a reason to build the mask: the kernel applies the window
    return sdpa_mask(*args, local_size=local_size, config=config, **kwargs)


def _causal_window(mask_function, window: int, config) -> bool:
    """Whether a mask function is exactly the causal sliding window of ``window`` keys that the
    attention layers will name in their ``sliding_window`` keyword (the config's): probed on
    rows around the window's edges (a chunked mask differs at the chunk boundary, a
    bidirectional one past the diagonal, a mixed one somewhere in between)."""
    if mask_function is None or getattr(config, "sliding_window", None) != window:
        return False
    q_idx = torch.tensor([0, 1, window - 1, window, window + 1, 2 * window + 1])[:, None]
    kv_idx = torch.arange(2 * window + 2)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, q_idx, kv_idx)
    except (IndexError, RuntimeError, TypeError, ValueError):  # needs more than positions
        return False
    expected = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
    return bool(torch.equal(torch.as_tensor(got).expand_as(expected).bool(), expected))


def attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What transformers' attention layers call: ``query (B, Hq, Lq, D)``, ``key`` and
    ``value`` ``(B, Hkv, Lk, D)`` (GQA read in place, no ``repeat_kv``), a bool or float
    ``attention_mask`` ``(B, 1, Lq, Lk)`` or None. Returns ``((B, Lq, Hq, Dv), weights or
    None)``, weights only with ``output_attentions=True``."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{name}: cpuattn's attention does not take it; use attn_implementation="
                "'sdpa' or 'eager' for this model"
            )
    if dropout:
        raise ValueError(
            f"dropout: cpuattn has no attention dropout, got {dropout} (call model.eval(), or "
            "set the config's attention dropout to 0 for training: attention_dropout, "
            "attention_probs_dropout_prob for BERT)"
        )
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    lq = query.shape[-2]
    # Learned sink logits (gpt-oss passes them as s_aux): one per head, in the denominator.
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    options: dict = {"scale": scaling, "softcap": softcap, "sinks": sinks}
    if attention_mask is not None:
        options["mask"] = attention_mask  # causal, window and padding are all in it
    elif is_causal:
        # No mask: no padding, and either Lq == Lk, one query (decode), or a prefill into an
        # empty static cache (keys past Lq unused): query i sits at key i (top-left), or the
        # one query at the last key. Sliding-window layers keep keys i - W + 1 .. i.
        options["causal"] = "top_left" if lq > 1 else True
        if sliding_window is not None:
            options["window"] = (sliding_window - 1, 0)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    spans = None  # packed sequences with no mask: their offsets
    if cu_q is not None and cu_k is not None and attention_mask is None:
        spans = (cu_q.tolist(), cu_k.tolist())
    if spans:
        out = _packed(query, key, value, *spans, options)
    else:
        # Written as (B, Lq, Hq, Dv) where it can be: the transpose below then copies nothing.
        out = cast(torch.Tensor, _attention(query, key, value, heads_last=True, **options))
    weights = None
    if kwargs.get("output_attentions"):
        if spans:
            weights = _packed_weights(query, key, value, *spans, options)
        else:
            weights = _weights(query, key, value, options)
    return out.transpose(1, 2).contiguous(), weights


def _spans(cu_q: list[int], cu_k: list[int]):
    """Each packed sequence's query and key rows."""
    return zip(itertools.pairwise(cu_q), itertools.pairwise(cu_k), strict=True)


def _packed(query, key, value, cu_q, cu_k, options) -> torch.Tensor:
    """Packed sequences (batch 1, sequence b at rows cu[b] .. cu[b + 1]), each on its own;
    rows past the last sequence (padding of the packed row) give 0."""
    parts = [
        cast(
            torch.Tensor,
            _attention(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], **options),
        )
        for (q0, q1), (k0, k1) in _spans(cu_q, cu_k)
    ]
    tail = query.shape[-2] - cu_q[-1]
    if tail > 0:
        parts.append(query.new_zeros((*query.shape[:-2], tail, value.shape[-1])))
    return torch.cat(parts, dim=-2)


def _packed_weights(query, key, value, cu_q, cu_k, options) -> torch.Tensor:
    """The weights of packed sequences: each sequence's block, 0 across sequences."""
    weights = query.new_zeros((*query.shape[:-1], key.shape[-2]))
    for (q0, q1), (k0, k1) in _spans(cu_q, cu_k):
        block = (query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1])
        weights[:, :, q0:q1, k0:k1] = _weights(*block, options)
    return weights


def _weights(query, key, value, options) -> torch.Tensor:
    """The softmax weights (no gradient), as eager attention returns them."""
    arrays = [_numpy(t) for t in (query, key, value)]
    numpy_options = {
        name: _numpy(val) if isinstance(val, torch.Tensor) else val for name, val in options.items()
    }
    _, weights = _api.attention(*arrays, return_weights=True, **numpy_options)
    return torch.from_numpy(weights).to(query.dtype)
