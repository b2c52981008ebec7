"""Draws docs/hybrid_patterns.png, the picture of docs/guide/hybrid.rst: which (query, key)
pairs local, global and hybrid attention keep, read back from cpuattn's own weights.

    python docs/hybrid_patterns.py        # needs matplotlib
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import cpuattn

L = 96
PATTERNS = {
    "local: causal, window (15, 0)": {"causal": True, "window": (15, 0)},
    "global: causal": {"causal": True},
    "hybrid: window + global tokens 0-3 and 48": {
        "causal": True,
        "window": (15, 0),
        "global_tokens": [0, 1, 2, 3, 48],
    },
}


def main() -> None:
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, L, 16))
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), constrained_layout=True)
    for ax, (title, options) in zip(axes, PATTERNS.items(), strict=True):
        _, weights = cpuattn.attention(q, k, v, return_weights=True, **options)
        kept = weights[0] > 0
        ax.imshow(kept, cmap="Blues", interpolation="nearest")
        ax.set_title(f"{title}\n{kept.sum()} of {L * L} pairs", fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.savefig(Path(__file__).with_name("hybrid_patterns.png"), dpi=110)


if __name__ == "__main__":
    main()
