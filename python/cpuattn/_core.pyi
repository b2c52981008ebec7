# Stubs for the compiled extension. Private: call cpuattn.attention, which validates.

import numpy as np
import numpy.typing as npt

__version__: str

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray | None,
    mask: np.ndarray | None,
    kv_lengths: np.ndarray | None,
    scale: float,
    causal: bool,
    align: int,
    window_left: int,
    window_right: int,
    num_threads: int,
    softcap: float,
    alibi: np.ndarray | None,
    additive_w: np.ndarray | None,
    cu_seqlens_q: np.ndarray | None = None,
    cu_seqlens_k: np.ndarray | None = None,
    diagonal: int | None = None,
    sinks: np.ndarray | None = None,
    k_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
    global_tokens: np.ndarray | None = None,
) -> None: ...
def attention_paged(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_table: np.ndarray,
    kv_lengths: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray | None,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    num_threads: int,
    softcap: float,
    alibi: np.ndarray | None,
    sinks: np.ndarray | None,
    k_scale: np.ndarray | None,
    v_scale: np.ndarray | None,
    cu_seqlens_q: np.ndarray | None,
    diagonal: int | None,
    global_tokens: np.ndarray | None = None,
) -> None: ...
def attention_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    dout: np.ndarray,
    lse: np.ndarray,
    delta: np.ndarray,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
    mask: np.ndarray | None,
    kv_lengths: np.ndarray | None,
    scale: float,
    causal: bool,
    align: int,
    window_left: int,
    window_right: int,
    num_threads: int,
    softcap: float,
    alibi: np.ndarray | None,
    diagonal: int | None,
    global_tokens: np.ndarray | None = None,
    bf16_inputs: bool = False,
) -> None: ...
def isa() -> str: ...
def supported_isas() -> list[str]: ...
def select_isa(name: str) -> None: ...
def openmp() -> bool: ...
def max_threads() -> int: ...
def threads_for_call(requested: int, calls_in_flight: int) -> int: ...

# Two pybind11 overloads: a C-contiguous float64 array gives float64, anything else is
# converted to float32 (forcecast) and gives float32.
def kernel_exp(x: npt.ArrayLike, isa: str) -> np.ndarray: ...
