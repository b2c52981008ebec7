"""Plots of attention weights (matplotlib: ``pip install "cpuattn[plot]"``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._request import as_int

# At 0.35 inch a token, 512 x 512 weights asked for a 180-inch figure (30 s and 8 GB to save):
# the figure is capped at MAX_INCHES a side, aspect kept, and each axis labels at most
# MAX_TICKS tokens (every n-th one), about what fits legibly along 12 inches.
INCHES_PER_TOKEN = 0.35
MAX_INCHES = 12.0
MAX_TICKS = 32


def attention_heatmap(
    weights,
    query_labels: Sequence[str] | None = None,
    key_labels: Sequence[str] | None = None,
    ax=None,
    head: int | None = None,
    title: str | None = None,
):
    """Draws ``weights`` (from ``attention(..., return_weights=True)``) as a heatmap.

    Parameters
    ----------
    weights : array ``(Lq, Lk)`` for one head, or ``(H, Lq, Lk)``
        With ``H`` heads, ``head`` picks one and ``None`` draws the mean over heads. Leading
        batch dims must be indexed away first.
    query_labels, key_labels : sequences of str, optional
        Tick labels (e.g. tokens), one per row / column. Past 32 tokens on an axis, every
        n-th one is labelled (at most 32 labels).
    ax : matplotlib Axes, optional
        The Axes to draw on; when None, a new figure of 0.35 inch a token, capped at 12
        inches a side (the aspect kept).
    head : int, optional
        The head to draw from ``(H, Lq, Lk)`` weights, in ``[-H, H)`` (else ValueError); None
        draws the mean over heads.
    title : str, optional
        Default: ``"head N"``, ``"mean over heads"`` or ``"attention weights"``.

    Returns
    -------
    matplotlib.axes.Axes
        The Axes drawn on.
    """
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            'attention_heatmap needs matplotlib: pip install "cpuattn[plot]"',
            name=exc.name,
        ) from exc

    w = np.asarray(weights, dtype=np.float64)
    if head is not None:
        head = as_int("head", head, "an int or None")
    if w.ndim == 3:
        if head is not None and not -w.shape[0] <= head < w.shape[0]:
            n = w.shape[0]
            raise ValueError(f"head: expected an index in [-{n}, {n}), got {head}")
        w = w.mean(axis=0) if head is None else w[head]
    if w.ndim != 2:
        raise ValueError(
            f"weights: expected (Lq, Lk) or (H, Lq, Lk), got shape {np.shape(weights)}"
        )
    for name, labels, n in (
        ("query_labels", query_labels, w.shape[0]),
        ("key_labels", key_labels, w.shape[1]),
    ):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name}: expected {n} labels, got {len(labels)}")
    if ax is None:
        width, height = (1 + INCHES_PER_TOKEN * n for n in (w.shape[1], w.shape[0]))
        shrink = min(1.0, MAX_INCHES / max(width, height))
        _, ax = plt.subplots(figsize=(width * shrink, height * shrink))
    image = ax.imshow(w, cmap="viridis", vmin=0, aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if query_labels is not None:
        rows = _ticks(len(query_labels))
        ax.set_yticks(rows, labels=[query_labels[i] for i in rows])
    if key_labels is not None:
        cols = _ticks(len(key_labels))
        ax.set_xticks(cols, labels=[key_labels[i] for i in cols], rotation=90)
    ax.set_title(
        title
        or (
            "mean over heads"
            if np.ndim(weights) == 3 and head is None
            else f"head {head}"
            if head is not None
            else "attention weights"
        )
    )
    return ax


def _ticks(n: int) -> range:
    """Every token up to MAX_TICKS of them, else every n-th: at most MAX_TICKS ticks."""
    return range(0, n, max(1, math.ceil(n / MAX_TICKS)))
