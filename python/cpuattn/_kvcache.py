"""A preallocated KV cache for decoding: append without reallocation, attend to valid keys only."""

from __future__ import annotations

import numpy as np

from ._quantize import I8, _quantize, as_floats
from ._request import BF16, F32, SUPPORTED_DTYPES, checked_sizes


class KVCache:
    """Keys and values of ``max_len`` positions for ``batch`` sequences, filled as decoding goes.

    A float16 / bfloat16 cache halves the bytes each decode step reads; queries may stay
    float32 (``attention`` takes float32 q with half k and v).

    ``k`` is ``(batch, num_kv_heads, max_len, head_dim)`` and ``v`` the same with ``value_dim``,
    allocated once; ``lengths`` (int64, ``(batch,)``) counts the valid positions of each
    sequence. Attend with ``kv_lengths=cache.lengths`` and ``causal=True`` (bottom-right): each
    new query sees the keys up to its own position and nothing past ``lengths`` is read, so
    the unused tail of the buffers costs nothing::

        cache = cpuattn.KVCache(batch=1, num_kv_heads=8, max_len=4096, head_dim=128)
        cache.append(k_new, v_new)                     # (1, 8, T, 128) each
        out = cpuattn.attention(q_new, cache.k, cache.v, kv_lengths=cache.lengths, causal=True)

    An int8 cache reads a quarter of float32's bytes (plus a scale per key): ``k`` and ``v`` are
    int8 and ``k_scale``, ``v_scale`` (float32, ``(batch, num_kv_heads, max_len)``) hold one
    scale per position and head (``append`` quantizes with :func:`quantize_int8`); pass the
    scales along::

        cache = cpuattn.KVCache(1, 8, 4096, 128, dtype=np.int8)
        cache.append(k_new, v_new)                     # float k_new, v_new
        out = cpuattn.attention(q_new, cache.k, cache.v, k_scale=cache.k_scale,
                                v_scale=cache.v_scale, kv_lengths=cache.lengths, causal=True)

    For the other dtypes ``k_scale`` and ``v_scale`` are None.

    Sizes are ints (NumPy ints and 0-d integer arrays too; a float or bool is a TypeError, a
    negative size a ValueError); ``dtype`` is float32, float64, float16, bfloat16 or int8.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype=np.float32,
    ):
        sizes = checked_sizes(
            "KVCache",
            batch=batch,
            num_kv_heads=num_kv_heads,
            max_len=max_len,
            head_dim=head_dim,
            value_dim=head_dim if value_dim is None else value_dim,
        )
        expected = "KVCache: dtype must be float32, float64, float16, bfloat16 or int8"
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"{expected}, got {dtype!r}") from None
        if dtype not in (*SUPPORTED_DTYPES, I8):
            raise TypeError(f"{expected}, got {dtype}")
        b, h, n = sizes["batch"], sizes["num_kv_heads"], sizes["max_len"]
        self.k = np.zeros((b, h, n, sizes["head_dim"]), dtype)
        self.v = np.zeros((b, h, n, sizes["value_dim"]), dtype)
        self.lengths = np.zeros(b, np.int64)
        self.k_scale = np.zeros((b, h, n), F32) if dtype == I8 else None
        self.v_scale = np.zeros((b, h, n), F32) if dtype == I8 else None

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k, v) -> None:
        """Writes ``T`` new positions after each sequence's valid ones.

        ``k``: ``(batch, num_kv_heads, T, head_dim)``, ``v``: ``(..., T, value_dim)``, any
        strides, real numbers cast to the cache dtype (quantized for an int8 cache, which also
        writes ``k_scale`` and ``v_scale``). Everything is checked before anything is written,
        so a failing append changes nothing: TypeError for k or v that are not real numbers
        (complex, strings), ValueError if the shapes do not match, a sequence would pass
        ``max_len`` or, for an int8 cache, k or v holds a non-finite value.
        """
        k = np.asarray(k)
        v = np.asarray(v)
        for name, x in (("k", k), ("v", v)):
            if x.dtype.kind not in "fiu" and x.dtype != BF16:
                raise TypeError(
                    f"KVCache.append: {name}: expected real numbers (cast to the cache's "
                    f"{self.k.dtype}), got dtype {x.dtype}"
                )
        b, h, _, d = self.k.shape
        dv = self.v.shape[-1]
        if k.ndim != 4 or k.shape[:2] != (b, h) or k.shape[3] != d:
            raise ValueError(f"KVCache.append: k must have shape ({b}, {h}, T, {d}), got {k.shape}")
        t = k.shape[2]
        if v.shape != (b, h, t, dv):
            raise ValueError(
                f"KVCache.append: v must have shape ({b}, {h}, {t}, {dv}) like k, got {v.shape}"
            )
        if b and int(self.lengths.max()) + t > self.max_len:
            raise ValueError(
                f"KVCache.append: {t} new positions after "
                f"{int(self.lengths.max())} would pass max_len = {self.max_len}"
            )
        if self.k_scale is not None and self.v_scale is not None:  # int8: quantize, then write
            k, k_scale = _quantize("KVCache.append: k", as_floats(k))
            v, v_scale = _quantize("KVCache.append: v", as_floats(v))
            for i, n in enumerate(self.lengths):
                self.k_scale[i, :, n : n + t] = k_scale[i]
                self.v_scale[i, :, n : n + t] = v_scale[i]
        for i, n in enumerate(self.lengths):
            self.k[i, :, n : n + t] = k[i]
            self.v[i, :, n : n + t] = v[i]
        self.lengths += t

    def reset(self) -> None:
        """Forgets every position (the buffers are kept and reused)."""
        self.lengths[:] = 0
