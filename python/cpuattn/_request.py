"""Normalize and validate the arguments of ``cpuattn.attention`` once, into a ``Request``.

Both backends take a ``Request``; neither re-derives semantics. Every check raises an error
naming the argument and what was expected, by one rule (also for ``KVCache``,
``MultiHeadAttention`` and ``merge``): ``TypeError`` for a wrong type (a float where an int
belongs, a bool where a number belongs, an integer array where a float one belongs),
``ValueError`` for a right type with a wrong value (a shape, a range). NumPy scalars and 0-d
arrays are accepted wherever a Python number is (:func:`as_int`, :func:`as_float`); bools are
not numbers here.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
F16, BF16 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)
I8 = np.dtype(np.int8)
HALF_DTYPES = (F16, BF16)
SUPPORTED_DTYPES = (F32, F64, F16, BF16)
CAUSAL_MODES = ("bottom_right", "top_left")


@dataclass(frozen=True)
class Request:
    """Canonical arguments. Arrays are views of the caller's data (no copies).

    ``q``, ``k``, ``v`` have shape ``(*batch, H, L, D)`` with at least 3 dims: a 2-D input
    ``(L, D)`` becomes ``(1, L, D)`` and ``squeeze_head`` remembers to undo it on output.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    batch_shape: tuple[int, ...]
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    dv: int
    dtype: np.dtype  # compute dtype: float64 for float64 inputs, else float32; also lse's
    out_dtype: np.dtype  # q's dtype, or float32 (out_dtype=) for half inputs
    mask: np.ndarray | None  # None, or bool / dtype view broadcast to (*batch, Hq, Lq, Lk)
    causal: bool
    align: str  # "bottom_right" or "top_left": anchors causal and window
    window: tuple[int, int]  # (left, right), -1 = unbounded; (-1, -1) = no window
    kv_lengths: np.ndarray | None  # None, or C-contiguous int64 of batch_shape
    scale: float
    return_lse: bool
    out: np.ndarray | None  # None, or a view of the caller's out in canonical shape
    user_out: np.ndarray | None  # the caller's out itself, returned as given
    num_threads: int | None
    squeeze_head: bool
    softcap: float = 0.0  # > 0: scores become softcap * tanh(score / softcap); 0 = off
    alibi: np.ndarray | None = None  # (*batch, Hq) slopes in the compute dtype, C-order
    additive_w: np.ndarray | None = None  # (D,): scores sum_d w[d] tanh(q + k), not q . k
    diagonal: int | None = None  # query i sits at key i + diagonal; None: from align
    sinks: np.ndarray | None = None  # (*batch, Hq) sink logits in the compute dtype, C-order
    # int8 k and v: float32 scales (*batch, Hkv, Lk), row j of k (v) times k_scale[..., j]
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None
    # Global tokens (hybrid attention): sorted distinct int64 positions, C-order; None when
    # there are none or no window (they change nothing then)
    globals: np.ndarray | None = None

    def offset(self, n_keys: int) -> int:
        """Query ``i``'s diagonal is key ``i + offset`` (causal, window, ALiBi): the caller's
        ``diagonal``, else ``n_keys - Lq`` (bottom-right) or ``0`` (top-left)."""
        if self.diagonal is not None:
            return self.diagonal
        return n_keys - self.lq if self.align == "bottom_right" else 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.hq, self.lq, self.dv)

    @property
    def lse_shape(self) -> tuple[int, ...]:
        return (*self.batch_shape, self.hq, self.lq)

    @property
    def group(self) -> int:
        """Query heads per kv head (1 = MHA, Hq = MQA)."""
        return self.hq // self.hkv if self.hkv else 0

    def finish(self, out: np.ndarray, lse: np.ndarray | None):
        """Give results the caller's shape (undo the 2-D promotion) and the requested arity."""
        if self.user_out is not None:
            out = self.user_out
        elif self.squeeze_head:
            out = out[0]
        if lse is not None and self.squeeze_head:
            lse = lse[0]
        return (out, lse) if self.return_lse else out


def build_request(
    q,
    k,
    v,
    *,
    mask=None,
    causal=False,
    window=None,
    scale=None,
    kv_lengths=None,
    return_lse=False,
    out=None,
    num_threads=None,
    out_dtype=None,
    softcap=None,
    alibi_slopes=None,
    additive_w=None,
    diagonal=None,
    sinks=None,
    k_scale=None,
    v_scale=None,
    global_tokens=None,
) -> Request:
    q = _as_float_array("q", q)
    k = _as_kv_array("k", k, k_scale)
    v = _as_kv_array("v", v, v_scale)
    dtype, out_dtype = _dtypes(q.dtype, k.dtype, v.dtype, out_dtype)

    if q.ndim < 2:
        raise ValueError(f"q: expected (*batch, Hq, Lq, D) or (Lq, D), got shape {q.shape}")
    for name, arr in (("k", k), ("v", v)):
        if arr.ndim != q.ndim:
            layout = "(Lk, D)" if q.ndim == 2 else "(*batch, Hkv, Lk, D)"
            raise ValueError(
                f"{name}: expected {q.ndim} dims {layout} like q, got shape {arr.shape}"
            )
    squeeze_head = q.ndim == 2
    if squeeze_head:
        q, k, v = q[None], k[None], v[None]

    batch_shape = q.shape[:-3]
    hq, lq, d = q.shape[-3:]
    for name, arr in (("k", k), ("v", v)):
        if arr.shape[:-3] != batch_shape:
            raise ValueError(
                f"{name}: batch dims {arr.shape[:-3]} differ from q's {batch_shape}; "
                "q, k and v must have equal batch dims"
            )
    hkv, lk, dk = k.shape[-3:]
    if dk != d:
        raise ValueError(
            f"k: expected (..., Hkv, Lk, {d}) to match q's head dim {d}, got {k.shape}"
        )
    if v.shape[-3:-1] != (hkv, lk):
        raise ValueError(
            f"v: expected (..., {hkv}, {lk}, Dv) to match k's (Hkv, Lk) = "
            f"({hkv}, {lk}), got {v.shape}"
        )
    dv = v.shape[-1]
    if lq > MAX_LENGTH or lk > MAX_LENGTH:
        name, axis, n = ("q", "Lq", lq) if lq > MAX_LENGTH else ("k", "Lk", lk)
        raise ValueError(f"{name}: expected {axis} <= 2**60, got {n}")
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):
        # Read as (B, L, H, D), the "heads" are lengths; say so when the real heads divide.
        hint = (
            "; if q, k and v are laid out (B, L, H, D), pass their (B, H, L, D) views "
            "x.swapaxes(-2, -3)"
            if lk and lq % lk == 0
            else ""
        )
        raise ValueError(
            f"k: its {hkv} kv heads must divide q's {hq} heads "
            f"(GQA/MQA: Hq % Hkv == 0), got q {q.shape}, k {k.shape}{hint}"
        )

    full_mask_shape = (*batch_shape, hq, lq, lk)
    causal_flag, align = _causal_mode(causal)
    window = _bounded(_window(window), lq, lk, _diagonal(diagonal))
    return _assemble(
        {
            "q": q,
            "k": k,
            "v": v,
            "batch_shape": batch_shape,
            "hq": hq,
            "hkv": hkv,
            "lq": lq,
            "lk": lk,
            "d": d,
            "dv": dv,
            "dtype": dtype,
            "out_dtype": out_dtype,
            "mask": _mask(mask, full_mask_shape, dtype, squeeze_head),
            "causal": causal_flag,
            "align": align,
            "window": window,
            "kv_lengths": _kv_lengths(kv_lengths, batch_shape, lk),
            "scale": _scale(scale, d),
            "return_lse": bool(return_lse),
            "out": _out(out, (*batch_shape, hq, lq, dv), out_dtype, squeeze_head),
            "user_out": out,
            "num_threads": _num_threads(num_threads),
            "squeeze_head": squeeze_head,
            "softcap": _softcap(softcap),
            "alibi": _alibi(alibi_slopes, batch_shape, hq, dtype, squeeze_head),
            "additive_w": _additive_w(additive_w, d, dtype),
            "diagonal": _diagonal(diagonal),
            "sinks": _per_head("sinks", sinks, batch_shape, hq, dtype, squeeze_head),
            "k_scale": _kv_scale("k_scale", k_scale, k),
            "v_scale": _kv_scale("v_scale", v_scale, v),
            "globals": _global_tokens(global_tokens, window, lq, lk, _diagonal(diagonal)),
        }
    )


REQUEST_FIELDS = frozenset(field.name for field in dataclasses.fields(Request))


def _assemble(fields: dict) -> Request:
    """A Request from all its fields at once. The generated ``__init__`` of a frozen
    dataclass sets each of its ~30 fields through ``object.__setattr__``: 5 us, a tenth of a
    small decode call's time in Python; this sets them in one step (the instance stays
    frozen: assigning a field still raises). A dict, not keywords: packing ~30 keywords into
    one costs 0.7 us more. The caller passes every field (a test holds build_request to
    REQUEST_FIELDS)."""
    req = object.__new__(Request)
    req.__dict__.update(fields)
    return req


def _describe(value) -> str:
    """A short description of a rejected argument, for error messages."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}, dtype {value.dtype}"
    text = repr(value) if isinstance(value, str) else str(value)
    return f"{type(value).__name__} {text[:40]}"


def _scalar(value):
    """A 0-d NumPy array as its NumPy scalar; anything else as it is."""
    return value[()] if isinstance(value, np.ndarray) and value.ndim == 0 else value


def as_int(name: str, value, expected: str = "an int") -> int:
    """``value`` as a Python int: a Python or NumPy integer, or a 0-d integer array.

    Anything else (a float, even 3.0; a bool; a string; a 1-d array) is a ``TypeError``
    ``"{name}: expected {expected}, got ..."``; callers check the value's range themselves.
    """
    if type(value) is int:  # the common case, and one torch.compile can trace (np.ndim not)
        return value
    value = _scalar(value)
    if not isinstance(value, (bool, np.bool_)) and np.ndim(value) == 0:
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")


def checked_sizes(owner: str, **values) -> dict[str, int]:
    """Each value as an int >= 0 (TypeError for a non-int, ValueError below 0), the message
    naming ``owner: name``; for the constructors of the caches."""
    out: dict[str, int] = {}
    for name, n in values.items():
        out[name] = as_int(f"{owner}: {name}", n, "an int >= 0")
        if out[name] < 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {out[name]}")
    return out


def as_float(name: str, value, expected: str = "a real number") -> float:
    """``value`` as a Python float: a real Python or NumPy number (bfloat16 too), or a 0-d
    array of one. Anything else (a bool, a complex, a string) is a ``TypeError``."""
    value = _scalar(value)
    real = isinstance(value, numbers.Real) or (
        isinstance(value, np.generic) and value.dtype == BF16
    )
    if not real or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    return float(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of the strings ``choices``: TypeError for a non-string,
    ValueError for another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _as_array(name: str, x) -> np.ndarray:
    """np.asarray(x), NumPy's own error (a ragged list) naming the argument."""
    try:
        return np.asarray(x)
    except ValueError as exc:
        raise ValueError(f"{name}: not an array: {exc}") from None


def _as_float_array(name: str, x) -> np.ndarray:
    arr = _as_array(name, x)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float64, float16 or bfloat16 array, got dtype {arr.dtype}"
        )
    return arr


def _as_kv_array(name: str, x, scale) -> np.ndarray:
    """k or v: a float array, or int8 with its scales (``k_scale`` / ``v_scale``)."""
    arr = _as_array(name, x)
    if arr.dtype == I8:
        if scale is None:
            raise TypeError(
                f"{name}: an int8 {name} needs {name}_scale (float32, {name}'s shape without "
                "the last axis), as cpuattn.quantize_int8 returns"
            )
        return arr
    if scale is not None:
        raise TypeError(f"{name}_scale: given for a {arr.dtype} {name}; scales go with int8 only")
    return _as_float_array(name, arr)


def _kv_scale(name: str, scale, x: np.ndarray) -> np.ndarray | None:
    """int8 k's (v's) scales as a float32 view or copy, shaped like x without its last axis
    (x is already canonical: a 2-D call's scales (Lk,) gain the head axis too). Not checked
    for NaN or inf: a scale is part of its key's row, and like a NaN in k or v it reaches only
    the rows that keep that key (so a cache's unused tail may hold anything)."""
    if scale is None:
        return None
    scale = np.asarray(scale)
    if scale.dtype.kind != "f" and scale.dtype != BF16:
        raise TypeError(f"{name}: expected float32 scales, got dtype {scale.dtype}")
    want = x.shape[:-1]
    if scale.shape != want and (1, *scale.shape) != want:
        raise ValueError(
            f"{name}: expected shape {want} ({name[0]}'s shape without its last axis), "
            f"got {scale.shape}"
        )
    return scale.reshape(want).astype(F32, copy=False)


def _dtypes(q, k, v, out_dtype) -> tuple[np.dtype, np.dtype]:
    """(compute dtype, output dtype). k and v share a dtype; q has it too, or is float32 with
    half k/v (a half KV cache), or any float but float64 with int8 k/v (with scales). Half and
    int8 inputs compute in float32."""
    if v != k:
        raise TypeError(f"v: dtype {v} differs from k's {k}; k and v must share one dtype")
    if k == I8:
        if q == F64:
            raise TypeError(
                "q: int8 k and v compute in float32: q must be float32, float16 or bfloat16, "
                "got float64"
            )
    elif q != k and not (q == F32 and k in HALF_DTYPES):
        raise TypeError(
            f"k: dtype {k} does not go with q's {q}: q, k and v share one dtype, "
            "except float32 q with float16/bfloat16 k and v"
        )
    compute = F64 if q == F64 else F32
    if out_dtype is None:
        return compute, q
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (q, compute):
        *first, last = ["None", *dict.fromkeys(str(t) for t in (q, compute))]  # no repeats
        allowed = f"{', '.join(first)} or {last}"
        raise TypeError(f"out_dtype: expected {allowed} for {q} inputs, got {out_dtype}")
    return compute, out_dtype


def _causal_mode(causal) -> tuple[bool, str]:
    causal = _scalar(causal)
    if isinstance(causal, (bool, np.bool_)):
        return bool(causal), "bottom_right"
    expected = f"causal: expected False, True, 'bottom_right' or 'top_left', got {causal!r}"
    if not isinstance(causal, str):
        raise TypeError(expected)
    if causal not in CAUSAL_MODES:
        raise ValueError(expected)
    return True, str(causal)


def _window(window) -> tuple[int, int]:
    if window is None:
        return (-1, -1)
    expected = "a (left, right) pair of ints >= -1 (-1 = unbounded), or None"
    try:
        sides = None if isinstance(window, str) else tuple(window)
    except TypeError:
        sides = None
    if sides is None:
        raise TypeError(f"window: expected {expected}, got {_describe(window)}")
    if len(sides) != 2:
        raise ValueError(f"window: expected {expected}, got {window!r} ({len(sides)} values)")
    left, right = (as_int(f"window[{i}]", x, "an int >= -1") for i, x in enumerate(sides))
    for i, value in enumerate((left, right)):
        if value < -1:
            raise ValueError(f"window[{i}]: expected an int >= -1 (-1 = unbounded), got {value}")
    return (left, right)


# Bounds on |diagonal| and on Lq and Lk, as the native binding's (longer axes exist only as
# zero-stride views). With window sides bounded too (_bounded), i + diagonal -+ a side + 1
# stays below 2 * 2**61 + 3 * 2**60 + 1: inside int64 in both backends.
MAX_DIAGONAL = 2**61
MAX_LENGTH = 2**60


def _bounded(window: tuple[int, int], lq: int, lk: int, diagonal: int | None) -> tuple[int, int]:
    """A window side past every key a row could reach (farther than Lq + Lk + |diagonal| from
    any diagonal) keeps what an unbounded side keeps: -1, so no backend adds it to a diagonal
    (int64 overflow would drop every key)."""
    farthest = lq + lk + abs(diagonal or 0)
    left, right = window
    return (-1 if left > farthest else left, -1 if right > farthest else right)


GLOBAL_TOKENS_EXPECTED = "an int >= 0 or a sorted 1-D array of int positions"


def _global_tokens(
    value, window: tuple[int, int], lq: int, lk: int, diagonal: int | None
) -> np.ndarray | None:
    """Global token positions as a sorted int64 array, or None: none given, none in reach, or
    no window (every kept pair is kept already then).

    An int ``n`` stands for the first ``n`` positions. An array must be 1-D, integer, sorted
    and distinct, each position in ``[0, 2**61]`` (the call's own positions), or with
    ``diagonal`` (a block of a longer sequence, positions relative to the block's first key)
    in ``[-2**61, 2**61]``. Positions past every key and query of the call are left out: they
    name no token of it (a sequence still shorter than the global prefix, other sequences'
    lengths in a batch), so a huge ``n`` costs nothing.
    """
    if value is None:
        return None
    if np.ndim(value) == 0:
        n = as_int("global_tokens", value, GLOBAL_TOKENS_EXPECTED)
        if n < 0:
            raise ValueError(
                f"global_tokens: expected an int >= 0 (the first n positions), got {n}"
            )
        if diagonal is None:  # keys and queries lie in [0, max(Lq, Lk)) (or below 0)
            positions = np.arange(min(n, max(lq, lk)), dtype=np.int64)
        else:  # keys [0, Lk), queries [diagonal, diagonal + Lq)
            queries = np.arange(max(diagonal, 0), min(n, diagonal + lq))
            positions = np.union1d(np.arange(min(n, lk)), queries).astype(np.int64)
    else:
        positions = global_positions(value, diagonal is not None)
        if diagonal is None:
            positions = positions[positions < max(lq, lk)]
    if window == (-1, -1) or positions.size == 0:
        return None
    return _aligned(positions, np.dtype(np.int64))


def globals_for(positions: np.ndarray | None, lq: int, lk: int, diagonal: int | None):
    """A request's global positions for one of its sequences (``lq`` queries, ``lk`` keys, a
    varlen or paged call's): those inside that sequence's range, as its own call takes them."""
    if positions is None or diagonal is not None:
        return positions
    return positions[positions < max(lq, lk)]


def global_positions(value, negative: bool) -> np.ndarray:
    """Explicit global positions as a checked 1-D int64 array: integers (no bools, floats or
    other objects), sorted and distinct, in ``[0, 2**61]``, or ``[-2**61, 2**61]`` where
    ``negative`` (with ``diagonal``). ``[]`` is no positions."""

    def wrong_type():
        return TypeError(
            f"global_tokens: expected {GLOBAL_TOKENS_EXPECTED}, got {_describe(value)}"
        )

    items = value if isinstance(value, list | tuple) else ()
    if isinstance(value, set | frozenset | dict | str) or any(
        isinstance(x, bool | np.bool_) for x in items
    ):
        raise wrong_type()
    try:
        positions = np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        raise wrong_type() from None
    low = -MAX_DIAGONAL if negative else 0
    where = "[-2**61, 2**61] with diagonal=" if negative else "[0, 2**61]"
    if positions.dtype == object and positions.ndim == 1:
        if not all(type(x) is int for x in positions):
            raise wrong_type()
        # Python ints past int64: out of range, not of the wrong type.
        raise ValueError(f"global_tokens: positions must lie in {where}, got {value!r}"[:200])
    if positions.size == 0 and positions.ndim == 1:  # [] is float64 to NumPy: none either way
        return positions.astype(np.int64)
    if positions.dtype.kind not in "iu":
        raise wrong_type()
    if positions.ndim != 1:
        raise ValueError(
            f"global_tokens: expected {GLOBAL_TOKENS_EXPECTED}, got shape {positions.shape}"
        )
    smallest, largest = int(positions.min()), int(positions.max())
    if smallest < low or largest > MAX_DIAGONAL:
        raise ValueError(
            f"global_tokens: positions must lie in {where}, got min {smallest}, max {largest}"
        )
    positions = positions.astype(np.int64)
    if (np.diff(positions) <= 0).any():
        raise ValueError(
            "global_tokens: positions must be sorted and distinct (strictly increasing)"
        )
    return positions


def _diagonal(diagonal) -> int | None:
    if diagonal is None:
        return None
    diagonal = as_int("diagonal", diagonal, "an int or None")
    if not -MAX_DIAGONAL <= diagonal <= MAX_DIAGONAL:
        raise ValueError(f"diagonal: expected an int in [-2**61, 2**61], got {diagonal}")
    return diagonal


def _scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    scale = as_float("scale", scale, "a real number or None")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def _mask(mask, full_shape, dtype, squeeze_head) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        pass
    elif mask.dtype.kind == "f" or mask.dtype == BF16:
        mask = mask.astype(dtype, copy=False)  # copies only the mask as given, before broadcast
    else:
        raise TypeError(
            f"mask: expected bool (True = attend) or a floating additive mask, "
            f"got dtype {mask.dtype}"
        )
    user_shape = full_shape[1:] if squeeze_head else full_shape
    expected = "(Lq, Lk)" if squeeze_head else "(*batch, Hq, Lq, Lk)"
    try:
        return np.broadcast_to(mask, full_shape)
    except ValueError:
        raise ValueError(
            f"mask: shape {mask.shape} does not broadcast to {expected} = {user_shape}"
        ) from None


def _kv_lengths(kv_lengths, batch_shape, lk) -> np.ndarray | None:
    if kv_lengths is None:
        return None
    lengths = np.asarray(kv_lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"kv_lengths: expected integers, got dtype {lengths.dtype}")
    try:
        lengths = np.broadcast_to(lengths, batch_shape)
    except ValueError:
        no_batch = (
            ": q, k and v ((H, L, D) or (L, D)) have no batch axis, so kv_lengths is one "
            "int; add a batch axis (x[None]) for lengths per sequence"
            if batch_shape == ()
            else ""
        )
        raise ValueError(
            f"kv_lengths: expected shape *batch = {batch_shape}, got {lengths.shape}{no_batch}"
        ) from None
    if lengths.size and (lengths.min() < 0 or lengths.max() > lk):
        raise ValueError(
            f"kv_lengths: values must lie in [0, Lk] = [0, {lk}], got "
            f"min {lengths.min()}, max {lengths.max()}"
        )
    return np.array(lengths, dtype=np.int64, order="C")  # small; keeps 0-d as 0-d


def _out(out, shape, dtype, squeeze_head) -> np.ndarray | None:
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    user_shape = shape[1:] if squeeze_head else shape
    if out.dtype != dtype:
        raise TypeError(f"out: expected dtype {dtype} (q's dtype, or out_dtype), got {out.dtype}")
    if out.shape != user_shape:
        raise ValueError(
            f"out: expected shape (*batch, Hq, Lq, Dv) = {user_shape}, got {out.shape}"
        )
    if not out.flags.writeable:
        raise ValueError("out: array is read-only")
    return out[None] if squeeze_head else out


def _softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    softcap = as_float("softcap", softcap, "a positive number or None")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap: expected a positive finite number or None, got {softcap}")
    return softcap


def _alibi(slopes, batch_shape, hq, dtype, squeeze_head) -> np.ndarray | None:
    return _per_head("alibi_slopes", slopes, batch_shape, hq, dtype, squeeze_head)


def _per_head(name, values, batch_shape, hq, dtype, squeeze_head) -> np.ndarray | None:
    """One finite number per query head, ``(Hq,)`` or ``(*batch, Hq)``, as a C-ordered
    ``(*batch, Hq)`` array in the compute dtype (ALiBi slopes, sink logits)."""
    if values is None:
        return None
    values = np.asarray(values)
    if values.dtype.kind not in "fiu" and values.dtype != BF16:
        raise TypeError(f"{name}: expected real numbers, got dtype {values.dtype}")
    shape = (hq,) if squeeze_head else (*batch_shape, hq)
    if values.shape not in ((hq,), shape):
        expected = f"(Hq,) = {shape}"  # no batch: that is the only shape
        if shape != (hq,):
            expected = f"(Hq,) or (*batch, Hq) = {(hq,)} or {shape}"
        raise ValueError(f"{name}: expected shape {expected}, got {values.shape}")
    values = _aligned(np.broadcast_to(values, (*batch_shape, hq)), dtype)
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: expected finite values")
    return values


def _additive_w(w, d, dtype) -> np.ndarray | None:
    if w is None:
        return None
    w = np.asarray(w)
    if w.dtype.kind not in "fiu" and w.dtype != BF16:
        raise TypeError(f"w: expected real numbers, got dtype {w.dtype}")
    if w.shape != (d,):
        raise ValueError(f"w: expected shape (D,) = ({d},), got {w.shape}")
    w = _aligned(w, dtype)
    if not np.isfinite(w).all():
        raise ValueError("w: expected finite values")
    return w


def _aligned(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x as a C-contiguous, aligned array of dtype: what the kernel reads in place. Small
    arrays sent by dask.distributed arrive inline in a message, often misaligned."""
    x = np.ascontiguousarray(x, dtype=dtype)
    return x if x.flags.aligned else x.copy()


def _num_threads(num_threads) -> int | None:
    if num_threads is None:
        return None
    num_threads = as_int("num_threads", num_threads, "a positive int or None")
    if num_threads < 1:
        raise ValueError(f"num_threads: expected a positive int or None, got {num_threads}")
    return num_threads
