"""Additive (Bahdanau) attention, on the same tiled online-softmax machinery."""

from __future__ import annotations

from ._api import BACKENDS, run_request
from ._request import build_request, check_choice


def additive_attention(
    q,
    k,
    v,
    w,
    *,
    mask=None,
    causal=False,
    window=None,
    kv_lengths=None,
    return_lse=False,
    out=None,
    num_threads=None,
    backend="auto",
):
    """Bahdanau attention: ``s[i, j] = sum_d w[d] * tanh(q[i, d] + k[j, d])``, then the same
    masked, numerically stable softmax over the kept keys and ``@ v`` as :func:`attention`.

    ``q`` and ``k`` are already projected (``(*batch, Hq, Lq, D)``, ``(*batch, Hkv, Lk, D)``),
    ``w`` has shape ``(D,)``. Shapes, dtypes, GQA, ``mask``, ``causal``, ``window``,
    ``kv_lengths``, ``return_lse``, ``out`` and threads behave as in :func:`attention`; there
    is no scale (fold it into ``w``). Tiled with an online softmax like attention (never an
    Lq x Lk score matrix), tanh vectorized in the native kernels.

    Matches ``keras.layers.AdditiveAttention(use_scale=True)`` with ``scale = w``: Keras
    computes ``reduce_sum(scale * tanh(query[..., :, None, :] + key[..., None, :, :]), -1)``,
    a softmax over keys (its mask: True = keep, like cpuattn's bool mask) and ``@ value``.
    """
    check_choice("backend", backend, BACKENDS)
    if w is None:
        raise TypeError("w: expected an array of shape (D,), got None")
    req = build_request(
        q,
        k,
        v,
        mask=mask,
        causal=causal,
        window=window,
        scale=1.0,
        kv_lengths=kv_lengths,
        return_lse=return_lse,
        out=out,
        num_threads=num_threads,
        additive_w=w,
    )
    return run_request(req, backend)
