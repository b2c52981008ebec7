"""A preallocated KV cache for decoding: append without reallocation, attend to valid keys only."""

from __future__ import annotations

import numpy as np

from ._request import SUPPORTED_DTYPES


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
        for name, n in (
            ("batch", batch),
            ("num_kv_heads", num_kv_heads),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
                raise ValueError(f"KVCache: {name} must be a non-negative int, got {n!r}")
        value_dim = head_dim if value_dim is None else value_dim
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"KVCache: dtype must be float32, float64, float16 or bfloat16, got {dtype}"
            )
        self.k = np.zeros((batch, num_kv_heads, max_len, head_dim), dtype)
        self.v = np.zeros((batch, num_kv_heads, max_len, value_dim), dtype)
        self.lengths = np.zeros(batch, np.int64)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k, v) -> None:
        """Writes ``T`` new positions after each sequence's valid ones.

        ``k``: ``(batch, num_kv_heads, T, head_dim)``, ``v``: ``(..., T, value_dim)``, any
        strides, cast to the cache dtype. Raises ValueError (and changes nothing) if a
        sequence would pass ``max_len`` or the shapes do not match.
        """
        k = np.asarray(k)
        v = np.asarray(v)
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
        for i, n in enumerate(self.lengths):
            self.k[i, :, n : n + t] = k[i]
            self.v[i, :, n : n + t] = v[i]
        self.lengths += t

    def reset(self) -> None:
        """Forgets every position (the buffers are kept and reused)."""
        self.lengths[:] = 0
