"""The attention weights themselves (``return_weights=True``): O(Lq x Lk), for inspection."""

from __future__ import annotations

import numpy as np

from ._numpy import _score_mods, apply_mask, kept_pairs, key_rows
from ._request import Request


def attention_weights(req: Request, lse: np.ndarray) -> np.ndarray:
    """softmax weights ``exp(s - lse)`` over kept keys, 0 elsewhere: ``(*batch, Hq, Lq, Lk)``.

    Recomputes the scores (one (group, Lq, Lk) block per kv head) with the same modifiers and
    masks as the backends; ``lse`` is the call's own, so each non-empty row sums to 1 and an
    empty row is all 0.
    """
    weights = np.zeros((*req.batch_shape, req.hq, req.lq, req.lk), req.dtype)
    positions, keys = np.arange(req.lq), np.arange(req.lk)
    g = req.group
    with np.errstate(invalid="ignore", over="ignore"):
        for b in np.ndindex(*req.batch_shape):
            n_keys = req.lk if req.kv_lengths is None else int(req.kv_lengths[b])
            bounds = kept_pairs(req, positions, keys, n_keys)
            for hk in range(req.hkv):
                heads = slice(hk * g, (hk + 1) * g)
                q = req.q[b][heads].astype(req.dtype, copy=False) * req.scale
                s = q @ key_rows(req, b, hk, 0, req.lk).T  # (group, Lq, Lk)
                s = _score_mods(req, s, b, heads, positions, keys, n_keys)
                keep = np.broadcast_to(bounds, s.shape)
                if req.mask is not None:
                    s, keep = apply_mask(s, keep, req.mask[b][heads])
                p = np.exp(s - lse[b][heads][..., None])
                weights[b][heads] = np.where(keep, p, 0)
    return weights
