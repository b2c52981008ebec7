"""Greedy decoding with a Llama-architecture model in NumPy: cpuattn.attention + KVCache,
or a paged int8 cache (cpuattn.PagedKVCache + attention_paged).

RMSNorm, rotary position embeddings (RoPE), grouped-query attention and a SwiGLU MLP, with the
weights of a ``transformers.LlamaForCausalLM`` (any size; the demo builds a small random one,
no download). Each decode step appends one position to the cache and attends with
``kv_lengths`` and bottom-right causal alignment, so it reads only the valid keys.

    python examples/llama_decode.py                 # a float32 KVCache per layer
    python examples/llama_decode.py --paged-int8    # a paged int8 cache per layer
"""

from __future__ import annotations

import time

import numpy as np

import cpuattn


class Llama:
    """Weights as NumPy float32 arrays, keyed like LlamaForCausalLM's state_dict."""

    def __init__(
        self,
        weights: dict,
        *,
        num_heads: int,
        num_kv_heads: int,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
    ):
        self.w = weights
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.hidden = weights["model.embed_tokens.weight"].shape[1]
        self.head_dim = self.hidden // num_heads
        self.eps = np.float32(rms_norm_eps)
        self.layers = sum(1 for name in weights if name.endswith(".self_attn.q_proj.weight"))
        half = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        self.inv_freq = (1.0 / rope_theta**half).astype(np.float32)

    @classmethod
    def from_transformers(cls, model) -> Llama:
        config = model.config
        weights = {name: t.detach().cpu().float().numpy() for name, t in model.state_dict().items()}
        if "lm_head.weight" not in weights:  # tied embeddings
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        theta = getattr(config, "rope_theta", None) or (
            getattr(config, "rope_parameters", None) or {}
        ).get("rope_theta", 10000.0)
        return cls(
            weights,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=theta,
        )

    def new_cache(self, batch: int, max_len: int, paged_int8: bool = False) -> list:
        """One cache per layer: a KVCache, or a PagedKVCache of int8 blocks of 16 positions."""
        if paged_int8:
            blocks = batch * -(-max_len // 16)
            return [
                PagedCache(
                    cpuattn.PagedKVCache(
                        blocks, 16, self.num_kv_heads, self.head_dim, dtype=np.int8
                    ),
                    batch,
                )
                for _ in range(self.layers)
            ]
        return [
            DenseCache(cpuattn.KVCache(batch, self.num_kv_heads, max_len, self.head_dim))
            for _ in range(self.layers)
        ]

    def forward(self, ids: np.ndarray, caches) -> np.ndarray:
        """Logits (B, T, vocab) for T new tokens per sequence, appended after the caches."""
        _, t = ids.shape
        start = caches[0].length
        cos, sin = self.rope(np.arange(start, start + t))
        x = self.w["model.embed_tokens.weight"][ids]
        for i, cache in enumerate(caches):
            p = f"model.layers.{i}."
            h = self.rms_norm(x, self.w[p + "input_layernorm.weight"])
            x = x + self.attention(h, p + "self_attn.", cache, cos, sin)
            h = self.rms_norm(x, self.w[p + "post_attention_layernorm.weight"])
            x = x + self.mlp(h, p + "mlp.")
        x = self.rms_norm(x, self.w["model.norm.weight"])
        return linear(x, self.w["lm_head.weight"])

    def attention(self, x, prefix, cache, cos, sin):
        b, t, _ = x.shape
        w, dh = self.w, self.head_dim

        def heads(name, n):
            return linear(x, w[prefix + name]).reshape(b, t, n, dh).swapaxes(1, 2)

        q = rotate(heads("q_proj.weight", self.num_heads), cos, sin)
        k = rotate(heads("k_proj.weight", self.num_kv_heads), cos, sin)
        cache.append(k, heads("v_proj.weight", self.num_kv_heads))
        out = np.empty((b, t, self.num_heads, dh), np.float32)
        cache.attend(q, out.swapaxes(1, 2))
        return linear(out.reshape(b, t, self.hidden), w[prefix + "o_proj.weight"])

    def mlp(self, x, prefix):
        gate = linear(x, self.w[prefix + "gate_proj.weight"])
        up = linear(x, self.w[prefix + "up_proj.weight"])
        return linear(gate / (1 + np.exp(-gate)) * up, self.w[prefix + "down_proj.weight"])

    def rms_norm(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def rope(self, positions):
        freqs = positions[:, None].astype(np.float32) * self.inv_freq[None, :]
        angles = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(angles), np.sin(angles)

    def generate(self, ids: np.ndarray, new_tokens: int, paged_int8: bool = False) -> np.ndarray:
        """Greedy decoding: the prompt in one prefill pass, then one token per step."""
        caches = self.new_cache(ids.shape[0], ids.shape[1] + new_tokens, paged_int8)
        logits = self.forward(ids, caches)
        out = [ids]
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1)[:, None]
            out.append(token)
            logits = self.forward(token, caches)
        return np.concatenate(out, axis=1)


class DenseCache:
    """A layer's KVCache: contiguous (B, Hkv, max_len, D) buffers."""

    def __init__(self, cache: cpuattn.KVCache):
        self.cache = cache

    @property
    def length(self) -> int:
        return int(self.cache.lengths[0])

    def append(self, k, v):
        self.cache.append(k, v)

    def attend(self, q, out):
        c = self.cache
        cpuattn.attention(q, c.k, c.v, kv_lengths=c.lengths, causal=True, out=out)


class PagedCache:
    """A layer's PagedKVCache with one sequence per batch row (int8: quantized on append)."""

    def __init__(self, cache: cpuattn.PagedKVCache, batch: int):
        self.cache = cache
        self.seqs = [cache.add_sequence() for _ in range(batch)]

    @property
    def length(self) -> int:
        return int(self.cache.lengths(self.seqs[:1])[0])

    def append(self, k, v):
        self.cache.append(self.seqs, k, v)

    def attend(self, q, out):
        self.cache.attend(q, self.seqs, causal=True, out=out)


def linear(x, w):
    """x @ w.T over the last axis, as one 2-D GEMM."""
    return (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])


def rotate(x, cos, sin):
    """RoPE as transformers applies it: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def small_random_model(seed: int = 0):
    """A LlamaForCausalLM with random weights: hidden 256, 4 layers, 8 heads, 2 kv heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


if __name__ == "__main__":
    import sys

    import torch

    paged_int8 = "--paged-int8" in sys.argv[1:]
    model = small_random_model()
    llama = Llama.from_transformers(model)
    prompt = np.random.default_rng(0).integers(0, 1000, (1, 16))
    start = time.perf_counter()
    ours = llama.generate(prompt, 64, paged_int8)
    ours_s = time.perf_counter() - start
    with torch.inference_mode():
        start = time.perf_counter()
        theirs = model.generate(
            torch.from_numpy(prompt), max_new_tokens=64, do_sample=False, min_new_tokens=64
        ).numpy()
        theirs_s = time.perf_counter() - start
    cache = "a paged int8 cache" if paged_int8 else "a float32 KVCache"
    differ = np.flatnonzero(ours[0, prompt.shape[1] :] != theirs[0, prompt.shape[1] :])
    same = "identical tokens" if differ.size == 0 else f"tokens identical up to {differ[0]} of 64"
    print(
        f"{cache}: {same}; cpuattn {64 / ours_s:.0f} tokens/s, "
        f"transformers {64 / theirs_s:.0f} tokens/s"
    )
    if paged_int8 and differ.size:
        print(
            "(a random model's next-token logits are nearly tied, so int8's rounding of K and V "
            "can flip a greedy choice; docs/guide/serving.rst measures the error on real weights)"
        )
