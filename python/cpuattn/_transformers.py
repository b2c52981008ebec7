"""``attn_implementation="cpuattn"`` for Hugging Face transformers models
(:func:`cpuattn.torch.register_transformers`).

Two registrations: the attention function (``AttentionInterface``) and the mask function
(``AttentionMaskInterface``: without one, transformers passes no mask at all, padding
included). The mask is transformers' own ``sdpa_mask`` with one change: it may skip building a
mask for a sliding-window layer as for a full one (a causal call with no padding), because the
attention function takes the window from the ``sliding_window`` keyword the models pass, as a
cpuattn window: no ``Lq x Lk`` mask is built for it.
"""

from __future__ import annotations

from typing import cast

import torch

from . import _api
from .torch import _numpy, attention


def register(name: str) -> str:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask)
    return name


def mask(*args, local_size=None, **kwargs):
    """transformers' ``sdpa_mask`` (bool ``(B, 1, Lq, Lk)``, True = attend, or None where a
    causal or bidirectional call with no padding needs none), allowed to skip sliding-window
    layers too: attention_forward applies their window itself."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


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
    if dropout:
        raise ValueError(
            f"dropout: cpuattn has no attention dropout, got {dropout} (call model.eval(), or "
            "set the config's attention_dropout to 0 for training)"
        )
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    lq = query.shape[-2]
    options: dict = {"scale": scaling, "softcap": softcap}
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
    if cu_q is not None and cu_k is not None and attention_mask is None:
        out = _packed(query, key, value, cu_q, cu_k, options)
    else:
        out = cast(torch.Tensor, attention(query, key, value, **options))
    weights = None
    if kwargs.get("output_attentions"):
        weights = _weights(query, key, value, options)
    return out.transpose(1, 2).contiguous(), weights


def _packed(query, key, value, cu_q, cu_k, options) -> torch.Tensor:
    """Packed sequences (batch 1, sequence b at rows cu[b] .. cu[b + 1]): each on its own."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    parts = [
        cast(
            torch.Tensor,
            attention(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], **options),
        )
        for q0, q1, k0, k1 in zip(starts_q, starts_q[1:], starts_k, starts_k[1:], strict=False)
    ]
    return torch.cat(parts, dim=-2)


def _weights(query, key, value, options) -> torch.Tensor:
    """The softmax weights (no gradient), as eager attention returns them."""
    arrays = [_numpy(t) for t in (query, key, value)]
    numpy_options = {
        name: _numpy(val) if isinstance(val, torch.Tensor) else val for name, val in options.items()
    }
    _, weights = _api.attention(*arrays, return_weights=True, **numpy_options)
    return torch.from_numpy(weights).to(query.dtype)
