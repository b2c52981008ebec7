"""cpuattn: fast, memory-lean softmax attention for NumPy arrays on CPUs.

>>> import cpuattn
>>> out = cpuattn.attention(q, k, v, causal=True)  # doctest: +SKIP
"""

from ._additive import additive_attention
from ._api import attention, info, merge
from ._backward import attention_backward
from ._kvcache import KVCache
from ._mha import MultiHeadAttention
from ._paged import attention_paged
from ._paged_cache import PagedKVCache
from ._quantize import dequantize_int8, quantize_int8
from ._varlen import attention_varlen, attention_varlen_backward
from ._version import __version__

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "PagedKVCache",
    "__version__",
    "additive_attention",
    "attention",
    "attention_backward",
    "attention_paged",
    "attention_varlen",
    "attention_varlen_backward",
    "dequantize_int8",
    "info",
    "merge",
    "quantize_int8",
]
