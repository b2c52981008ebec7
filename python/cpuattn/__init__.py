"""cpuattn: fast, memory-lean softmax attention for NumPy arrays on CPUs.

>>> import cpuattn
>>> out = cpuattn.attention(q, k, v, causal=True)  # doctest: +SKIP
"""

from ._additive import additive_attention
from ._api import attention, info, merge
from ._backward import attention_backward
from ._kvcache import KVCache
from ._mha import MultiHeadAttention
from ._varlen import attention_varlen, attention_varlen_backward
from ._version import __version__

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "__version__",
    "additive_attention",
    "attention",
    "attention_backward",
    "attention_varlen",
    "attention_varlen_backward",
    "info",
    "merge",
]
