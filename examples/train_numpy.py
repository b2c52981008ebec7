"""Train a small causal attention layer in NumPy: cpuattn.attention + cpuattn.attention_backward.

A student layer (projections Wq, Wk, Wv, Wo around multi-head causal attention) learns to
reproduce a teacher layer of the same shape with random weights, by Adam on the mean squared
error. The gradients of the projections are plain matrix products; those through attention
come from ``cpuattn.attention_backward``, fed the ``out`` and ``lse`` the forward returned.
No download, a few seconds.

    python examples/train_numpy.py
"""

from __future__ import annotations

import numpy as np

import cpuattn

BATCH, LENGTH, MODEL, HEADS, HEAD_DIM = 8, 32, 16, 2, 8
NAMES = ("wq", "wk", "wv", "wo")


def init(rng: np.random.Generator, gain: float = 1.0) -> dict[str, np.ndarray]:
    width = HEADS * HEAD_DIM
    shapes = {"wq": (MODEL, width), "wk": (MODEL, width), "wv": (MODEL, width)}
    shapes["wo"] = (width, MODEL)
    return {n: gain * rng.standard_normal(s) / np.sqrt(s[0]) for n, s in shapes.items()}


def heads(x: np.ndarray) -> np.ndarray:
    """(B, L, H * D) -> (B, H, L, D), a strided view: cpuattn reads it in place."""
    return x.reshape(BATCH, LENGTH, HEADS, HEAD_DIM).swapaxes(1, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, H, L, D) -> (B, L, H * D)."""
    return x.swapaxes(1, 2).reshape(BATCH, LENGTH, HEADS * HEAD_DIM)


def forward(w: dict, x: np.ndarray):
    q, k, v = heads(x @ w["wq"]), heads(x @ w["wk"]), heads(x @ w["wv"])
    out, lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    return merge_heads(out) @ w["wo"], (q, k, v, out, lse)


def gradients(w: dict, x: np.ndarray, target: np.ndarray) -> tuple[float, dict]:
    prediction, (q, k, v, out, lse) = forward(w, x)
    error = prediction - target
    loss = float(np.mean(error**2))
    d_prediction = 2 * error / error.size
    concat = merge_heads(out)
    grads = {"wo": concat.reshape(-1, concat.shape[-1]).T @ d_prediction.reshape(-1, MODEL)}
    dout = heads(d_prediction @ w["wo"].T)
    dq, dk, dv = cpuattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    flat_x = x.reshape(-1, MODEL)
    for name, d in (("wq", dq), ("wk", dk), ("wv", dv)):
        grads[name] = flat_x.T @ merge_heads(d).reshape(-1, HEADS * HEAD_DIM)
    return loss, grads


def train(steps: int = 300, lr: float = 1e-2, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    teacher, student = init(rng, gain=2.0), init(rng)
    x = rng.standard_normal((BATCH, LENGTH, MODEL))
    target, _ = forward(teacher, x)
    m = {n: np.zeros_like(student[n]) for n in NAMES}  # Adam's moments
    s = {n: np.zeros_like(student[n]) for n in NAMES}
    losses = []
    for t in range(1, steps + 1):
        loss, grads = gradients(student, x, target)
        losses.append(loss)
        for n in NAMES:
            m[n] = 0.9 * m[n] + 0.1 * grads[n]
            s[n] = 0.999 * s[n] + 0.001 * grads[n] ** 2
            step = (m[n] / (1 - 0.9**t)) / (np.sqrt(s[n] / (1 - 0.999**t)) + 1e-8)
            student[n] -= lr * step
    return losses


def main() -> None:
    losses = train()
    for step in (0, 50, 100, 200, len(losses) - 1):
        print(f"step {step:4d}  loss {losses[step]:.4f}")
    assert losses[-1] < 0.2 * losses[0], "the loss did not go down"
    print(f"loss fell {losses[0] / losses[-1]:.1f}x")


if __name__ == "__main__":
    main()
