# Stubs for the compiled extension. Private: call cpuattn.attention, which validates.
from typing import List, Optional

import numpy as np

__version__: str

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: Optional[np.ndarray],
    mask: Optional[np.ndarray],
    kv_lengths: Optional[np.ndarray],
    scale: float,
    causal: bool,
    align: int,
    window_left: int,
    window_right: int,
    num_threads: int,
    softcap: float,
    alibi: Optional[np.ndarray],
    additive_w: Optional[np.ndarray],
    cu_seqlens_q: Optional[np.ndarray] = None,
    cu_seqlens_k: Optional[np.ndarray] = None,
) -> None: ...
def isa() -> str: ...
def supported_isas() -> List[str]: ...
def select_isa(name: str) -> None: ...
def openmp() -> bool: ...
def max_threads() -> int: ...
def threads_for_call(requested: int, calls_in_flight: int) -> int: ...
def kernel_exp(x: np.ndarray, isa: str) -> np.ndarray: ...
