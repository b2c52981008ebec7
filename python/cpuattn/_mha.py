"""Multi-head attention as a layer: NumPy projections (BLAS) around ``cpuattn.attention``."""

from __future__ import annotations

import sys

import numpy as np

from ._api import build_request, run_request
from ._kvcache import KVCache
from ._request import BF16, F32, HALF_DTYPES, SUPPORTED_DTYPES, as_int


class MultiHeadAttention:
    """``out = attention(x W_Q^T + b_Q, x W_K^T + b_K, x W_V^T + b_V) W_O^T + b_O``, per head.

    Weights follow ``torch.nn.Linear``: ``w_q`` is ``(embed_dim, embed_dim)`` as (out, in),
    ``w_k`` is ``(num_kv_heads * head_dim, kdim)``, ``w_v`` is ``(num_kv_heads * head_dim,
    vdim)``, ``w_o`` is ``(embed_dim, embed_dim)``. ``num_kv_heads < num_heads`` is GQA
    (``num_kv_heads = 1``: MQA). Inputs are ``(B, L, E)``; heads are split by reshape and
    swapaxes views, which ``cpuattn.attention`` reads in place, and the heads' output is
    written straight into a ``(B, L, H, Dh)`` buffer, so only the projections allocate.

    Build with ``MultiHeadAttention(embed_dim, num_heads, ...)`` (random Xavier-uniform
    weights, zero biases), :meth:`from_arrays` or :meth:`from_torch`. Sizes are ints (NumPy
    ints too; a float is a TypeError); ``dtype`` (the weights', :attr:`dtype`) is float32,
    float64, float16 or bfloat16, anything else a TypeError. Inputs are cast to it.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        dtype=np.float32,
        seed: int | None = None,
    ):
        embed_dim = as_int("MultiHeadAttention: embed_dim", embed_dim)
        num_heads = as_int("MultiHeadAttention: num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_kv_heads = as_int("MultiHeadAttention: num_kv_heads", num_kv_heads)
        _check_heads(embed_dim, num_heads, num_kv_heads)
        kdim = as_int("MultiHeadAttention: kdim", embed_dim if kdim is None else kdim)
        vdim = as_int("MultiHeadAttention: vdim", embed_dim if vdim is None else vdim)
        for name, n in (("kdim", kdim), ("vdim", vdim)):
            if n < 0:
                raise ValueError(f"MultiHeadAttention: {name} must be >= 0, got {n}")
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                "MultiHeadAttention: dtype must be float32, float64, float16 or bfloat16, "
                f"got {dtype}"
            )
        rng = np.random.default_rng(seed)
        kv_dim = num_kv_heads * (embed_dim // num_heads)

        def xavier(out_dim, in_dim):
            bound = np.sqrt(6.0 / (in_dim + out_dim))
            return rng.uniform(-bound, bound, (out_dim, in_dim)).astype(dtype)

        def zeros(n):
            return np.zeros(n, dtype) if bias else None

        self._set(
            xavier(embed_dim, embed_dim),
            xavier(kv_dim, kdim),
            xavier(kv_dim, vdim),
            xavier(embed_dim, embed_dim),
            zeros(embed_dim),
            zeros(kv_dim),
            zeros(kv_dim),
            zeros(embed_dim),
            num_heads,
            num_kv_heads,
        )

    @classmethod
    def from_arrays(
        cls,
        w_q,
        w_k,
        w_v,
        w_o,
        b_q=None,
        b_k=None,
        b_v=None,
        b_o=None,
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
    ) -> MultiHeadAttention:
        """A layer with the given weights ((out, in), as torch.nn.Linear) and biases."""
        layer = cls.__new__(cls)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        layer._set(w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, num_heads, num_kv_heads)
        return layer

    @classmethod
    def from_torch(cls, module) -> MultiHeadAttention:
        """Copies a ``torch.nn.MultiheadAttention``'s weights (float32); anything else is a
        TypeError.

        Call the result with ``(B, L, E)`` inputs whatever the module's ``batch_first``, and
        with cpuattn's mask polarity: torch's ``key_padding_mask`` / bool ``attn_mask`` mark
        *blocked* positions with True, so pass ``mask=~key_padding_mask[:, None, None, :]``
        or ``mask=~attn_mask``. Dropout is not applied (inference).
        """
        torch = sys.modules.get("torch")  # a module of that class means torch is imported
        if torch is None or not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(
                f"from_torch: expected a torch.nn.MultiheadAttention, got {type(module).__name__}"
            )
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv and add_zero_attn are not supported")

        def arr(t):
            return None if t is None else t.detach().cpu().numpy().astype(np.float32)

        e = module.embed_dim
        if module._qkv_same_embed_dim:
            w_q, w_k, w_v = np.split(arr(module.in_proj_weight), 3)
        else:
            w_q, w_k, w_v = (
                arr(module.q_proj_weight),
                arr(module.k_proj_weight),
                arr(module.v_proj_weight),
            )
        b_q = b_k = b_v = None
        if module.in_proj_bias is not None:
            b_q, b_k, b_v = np.split(arr(module.in_proj_bias), [e, 2 * e])
        return cls.from_arrays(
            w_q,
            w_k,
            w_v,
            arr(module.out_proj.weight),
            b_q,
            b_k,
            b_v,
            arr(module.out_proj.bias),
            num_heads=module.num_heads,
        )

    def _set(self, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, num_heads, num_kv_heads):
        num_heads = as_int("MultiHeadAttention: num_heads", num_heads)
        num_kv_heads = as_int("MultiHeadAttention: num_kv_heads", num_kv_heads)
        w_q, w_k, w_v, w_o = (np.asarray(w) for w in (w_q, w_k, w_v, w_o))
        for name, x in zip(
            ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"),
            (w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o),
            strict=True,
        ):
            if x is not None and np.asarray(x).dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"MultiHeadAttention: {name} must be a float32, float64, float16 or "
                    f"bfloat16 array, got dtype {np.asarray(x).dtype}"
                )
        # One dtype for the layer: the weights' common one; biases follow it.
        dtype = np.result_type(w_q, w_k, w_v, w_o)
        w_q, w_k, w_v, w_o = (w.astype(dtype, copy=False) for w in (w_q, w_k, w_v, w_o))
        b_q, b_k, b_v, b_o = (
            None if b is None else np.asarray(b).astype(dtype, copy=False)
            for b in (b_q, b_k, b_v, b_o)
        )
        embed_dim = w_q.shape[0]
        _check_heads(embed_dim, num_heads, num_kv_heads)
        head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * head_dim
        expected = {
            "w_q": (w_q, (embed_dim, embed_dim)),
            "w_k": (w_k, (kv_dim, w_k.shape[-1])),
            "w_v": (w_v, (kv_dim, w_v.shape[-1])),
            "w_o": (w_o, (embed_dim, embed_dim)),
        }
        for name, (w, shape) in expected.items():
            if w.ndim != 2 or w.shape != shape:
                raise ValueError(
                    f"MultiHeadAttention: {name} must have shape {shape} (out, in), got {w.shape}"
                )
        for name, b, n in (
            ("b_q", b_q, embed_dim),
            ("b_k", b_k, kv_dim),
            ("b_v", b_v, kv_dim),
            ("b_o", b_o, embed_dim),
        ):
            if b is not None and np.shape(b) != (n,):
                raise ValueError(
                    f"MultiHeadAttention: {name} must have shape ({n},), got {np.shape(b)}"
                )
        self.w_q, self.w_k, self.w_v, self.w_o = w_q, w_k, w_v, w_o
        self.b_q, self.b_k, self.b_v, self.b_o = b_q, b_k, b_v, b_o
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = head_dim

    def __call__(
        self,
        query,
        key=None,
        value=None,
        *,
        mask=None,
        causal=False,
        window=None,
        kv_lengths=None,
        cache: KVCache | None = None,
        global_tokens=None,
    ) -> np.ndarray:
        """Self-attention (``key`` and ``value`` default to ``query``) or cross-attention.

        query: ``(B, Lq, embed_dim)``; key: ``(B, Lk, kdim)``; value: ``(B, Lk, vdim)``.
        ``mask``, ``causal``, ``window``, ``global_tokens`` and ``kv_lengths`` are those of
        :func:`cpuattn.attention` (bool mask: True = attend), broadcast over heads as given.
        With ``cache``, the new keys and values are appended to it and the attention reads the
        whole cache with ``kv_lengths=cache.lengths`` (then ``kv_lengths`` must be None; pass
        ``causal=True`` for a decoder). The cache has the layer's dtype, or float16 /
        bfloat16 under a float32 layer (a half KV cache). Returns ``(B, Lq, embed_dim)`` in
        the layer's :attr:`dtype`.

        Floating inputs of another dtype are cast to the layer's dtype, as Keras layers do:
        float64 ``query`` (what ``np.random.randn`` gives) on the default float32 layer is
        computed and returned in float32. Non-float inputs (integers, complex) are a
        TypeError.

        Everything (inputs, cache, mask, causal, window, global tokens) is checked before the
        cache is appended to: a call that raises leaves ``cache`` unchanged, so a retry sees
        the same cache.
        """
        query = self._input("query", query)
        key = query if key is None else self._input("key", key)
        value = key if value is None else self._input("value", value)
        if query.ndim != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query: expected (B, Lq, {self.embed_dim}), got {query.shape}")
        for name, x, w in (("key", key, self.w_k), ("value", value, self.w_v)):
            if x.ndim != 3 or x.shape[0] != query.shape[0] or x.shape[-1] != w.shape[1]:
                raise ValueError(
                    f"{name}: expected ({query.shape[0]}, Lk, {w.shape[1]}), got {x.shape}"
                )
        b, lq, _ = query.shape
        lk = key.shape[1]
        if cache is not None:
            if kv_lengths is not None:
                raise ValueError("kv_lengths: must be None with cache= (the cache has lengths)")
            self._check_cache(cache, b, lk)
        q = self._heads(_linear(query, self.w_q, self.b_q), self.num_heads)
        k = self._heads(_linear(key, self.w_k, self.b_k), self.num_kv_heads)
        v = self._heads(_linear(value, self.w_v, self.b_v), self.num_kv_heads)
        heads = np.empty((b, lq, self.num_heads, self.head_dim), q.dtype)
        kv = (k, v) if cache is None else (cache.k, cache.v)  # views: they see the append
        if cache is not None:
            kv_lengths = cache.lengths + lk  # the lengths after the append
        # Validates mask, causal, window and shapes before the cache is touched.
        req = build_request(
            q,
            *kv,
            mask=mask,
            causal=causal,
            window=window,
            kv_lengths=kv_lengths,
            out=heads.swapaxes(1, 2),
            global_tokens=global_tokens,
        )
        if cache is not None:
            cache.append(k, v)
        run_request(req, "auto")
        return _linear(heads.reshape(b, lq, self.embed_dim), self.w_o, self.b_o)

    @property
    def dtype(self) -> np.dtype:
        """The weights' dtype: inputs are cast to it, and the output has it."""
        return self.w_q.dtype

    def _input(self, name: str, x) -> np.ndarray:
        """A floating input cast to the layer's dtype."""
        x = np.asarray(x)
        if x.dtype.kind != "f" and x.dtype != BF16:
            raise TypeError(
                f"{name}: expected a float array (cast to the layer's {self.dtype}), "
                f"got dtype {x.dtype}"
            )
        return x.astype(self.dtype, copy=False)

    def _check_cache(self, cache, b: int, t: int) -> None:
        """The checks ``cache.append`` and the attention would make, with this layer's names."""
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"cache: expected a cpuattn.KVCache or None, got {type(cache).__name__}"
            )
        dtype = cache.k.dtype
        if dtype != self.dtype and not (self.dtype == F32 and dtype in HALF_DTYPES):
            raise TypeError(
                f"cache: dtype {dtype} does not go with the layer's {self.dtype}: use a cache of "
                "the layer's dtype (or float16 / bfloat16 under a float32 layer)"
            )
        got = (*cache.k.shape[:2], cache.k.shape[3], cache.v.shape[3])
        if got != (b, self.num_kv_heads, self.head_dim, self.head_dim):
            raise ValueError(
                f"cache: expected KVCache(batch={b}, num_kv_heads={self.num_kv_heads}, max_len, "
                f"head_dim={self.head_dim}) for this layer and a batch of {b}, got batch="
                f"{got[0]}, num_kv_heads={got[1]}, head_dim={got[2]}, value_dim={got[3]}"
            )
        used = int(cache.lengths.max()) if b else 0
        if used + t > cache.max_len:
            raise ValueError(
                f"cache: {t} new positions after {used} would pass max_len = {cache.max_len}"
            )

    def _heads(self, x: np.ndarray, n_heads: int) -> np.ndarray:
        """(B, L, n * Dh) -> a (B, n, L, Dh) view."""
        return x.reshape(*x.shape[:2], n_heads, self.head_dim).swapaxes(1, 2)


def _linear(x, w, b):
    """x @ w.T + b over the last axis, as one 2-D GEMM (a stacked matmul runs one per row)."""
    y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
    if b is not None:
        y += b
    return y


def _check_heads(embed_dim, num_heads, num_kv_heads):
    if num_heads < 1 or embed_dim < 1 or embed_dim % num_heads:
        raise ValueError(
            f"MultiHeadAttention: embed_dim {embed_dim} must be a positive "
            f"multiple of num_heads {num_heads}"
        )
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"MultiHeadAttention: num_kv_heads {num_kv_heads} must divide num_heads {num_heads}"
        )
