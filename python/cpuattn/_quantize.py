"""Symmetric int8 quantization with one float32 scale per row of the last axis (int8 KV caches)."""

from __future__ import annotations

import numpy as np

from ._request import F32, I8, SUPPORTED_DTYPES

QMAX = 127  # symmetric: -128 is never used, so negating a row never overflows


def quantize_int8(x) -> tuple[np.ndarray, np.ndarray]:
    """Rounds ``x`` to int8, one float32 scale per row of the last axis.

    ``scale = max(abs(x)) / 127`` over the last axis and ``q = clip(rint(x / scale), -127, 127)``,
    both computed in float32 from ``x`` cast to float32, so ``q * scale`` is within
    ``scale / 2`` of ``x`` (of ``x`` rounded to float32 for a float64 ``x``). A row of zeros
    gets scale 0 and q 0, as does a row whose largest magnitude is so small (below about 1e-43) that the
    scale underflows float32.

    Parameters
    ----------
    x : array_like of float32, float64, float16 or bfloat16
        Any shape with at least one axis (size-0 axes too), any strides; finite values.

    Returns
    -------
    q : ndarray of int8
        ``x.shape``, C-contiguous.
    scales : ndarray of float32
        ``x.shape[:-1]``.

    Raises
    ------
    TypeError
        For another dtype (integers, complex, strings).
    ValueError
        For a 0-d ``x`` (no last axis) or non-finite values (also float64 values beyond the
        float32 range).

    Examples
    --------
    >>> import numpy as np
    >>> from cpuattn._quantize import quantize_int8, dequantize_int8
    >>> x = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    >>> q, scales = quantize_int8(x)
    >>> q
    array([[127, -64,  32],
           [  0,   0,   0]], dtype=int8)
    >>> scales * 127
    array([1., 0.], dtype=float32)
    >>> bool(np.all(np.abs(dequantize_int8(q, scales) - x) <= scales[:, None] / 2))
    True
    """
    return _quantize("x", x)


def _quantize(name: str, x) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_int8` with errors naming ``name`` (e.g. ``"KVCache.append: k"``)."""
    x = np.asarray(x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float64, float16 or bfloat16 array, got dtype {x.dtype}"
        )
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least 1 dim (one scale per row), got a 0-d array")
    with np.errstate(over="ignore"):  # float64 past float32's range becomes inf: reported below
        x = x.astype(F32, order="C")  # a copy: divided in place below
    if not np.isfinite(x).all():
        raise ValueError(
            f"{name}: expected finite values (within float32's range) to quantize, got "
            f"{np.count_nonzero(~np.isfinite(x))} that are not"
        )
    scales = np.max(np.abs(x), axis=-1, initial=0.0) / np.float32(QMAX)
    nonzero = (scales > 0)[..., None]
    np.divide(x, scales[..., None], out=x, where=nonzero)
    x[~np.broadcast_to(nonzero, x.shape)] = 0  # rows of scale 0 (all zeros, or underflow)
    q = np.clip(np.rint(x), -QMAX, QMAX).astype(I8)
    return q, scales


def dequantize_int8(q, scales, dtype=np.float32) -> np.ndarray:
    """``q * scales[..., None]``, computed in float32: the inverse of :func:`quantize_int8`.

    Parameters
    ----------
    q : array_like of int8
        At least one axis.
    scales : array_like of float32 (or another float dtype, cast to float32)
        ``q.shape[:-1]``: one scale per row of ``q``'s last axis.
    dtype : float32, float64, float16 or bfloat16
        The result's dtype (the product is computed in float32, then cast).

    Returns
    -------
    ndarray of ``dtype``, shape ``q.shape``

    Raises
    ------
    TypeError
        If ``q`` is not int8, ``scales`` not floating point or ``dtype`` not one of the above.
    ValueError
        If ``q`` is 0-d or ``scales``' shape is not ``q.shape[:-1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from cpuattn._quantize import dequantize_int8
    >>> dequantize_int8(np.array([[127, -2], [4, 0]], np.int8), np.array([0.5, 0.25], np.float32))
    array([[63.5, -1. ],
           [ 1. ,  0. ]], dtype=float32)
    """
    q = np.asarray(q)
    scales = np.asarray(scales)
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype: expected float32, float64, float16 or bfloat16, got {dtype}")
    if q.dtype != I8:
        raise TypeError(f"q: expected an int8 array, got dtype {q.dtype}")
    if scales.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"scales: expected a float32, float64, float16 or bfloat16 array, "
            f"got dtype {scales.dtype}"
        )
    if q.ndim == 0:
        raise ValueError("q: expected at least 1 dim (one scale per row), got a 0-d array")
    if scales.shape != q.shape[:-1]:
        raise ValueError(
            f"scales: expected shape q.shape[:-1] = {q.shape[:-1]}, got {scales.shape}"
        )
    out = q.astype(F32) * scales.astype(F32)[..., None]
    return out.astype(dtype, copy=False)


def as_floats(x: np.ndarray) -> np.ndarray:
    """``x`` if it is float32, float64, float16 or bfloat16, else (integers) cast to float32:
    what the caches quantize, since they take any real numbers."""
    return x if x.dtype in SUPPORTED_DTYPES else x.astype(F32)
