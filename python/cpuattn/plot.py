"""Plots of attention weights (matplotlib: ``pip install "cpuattn[plot]"``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
        Tick labels (e.g. tokens), one per row / column.
    ax : matplotlib Axes, optional
        The Axes to draw on; a new figure when None.
    head : int, optional
        The head to draw from ``(H, Lq, Lk)`` weights; None draws the mean over heads.
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
    if w.ndim == 3:
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
        _, ax = plt.subplots(figsize=(1 + 0.35 * w.shape[1], 1 + 0.35 * w.shape[0]))
    image = ax.imshow(w, cmap="viridis", vmin=0, aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if query_labels is not None:
        ax.set_yticks(range(len(query_labels)), labels=list(query_labels))
    if key_labels is not None:
        ax.set_xticks(range(len(key_labels)), labels=list(key_labels), rotation=90)
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
