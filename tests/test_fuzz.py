"""Fuzzed argument sets, valid and not: every call returns what the NumPy backend returns, or
raises ValueError / TypeError on both backends alike. Never a crash, never another exception.

Hypothesis draws a *recipe* (plain data); ``materialize`` builds the arrays from it, afresh for
each backend, because ``out`` may alias an input and so modify it. Examples per run:
CPUATTN_FUZZ_EXAMPLES (default 2000); the same examples every run (CI must not flake) unless
CPUATTN_FUZZ_RANDOM=1.
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpuattn
from cpuattn import _native
from cpuattn._request import BF16

ISAS = list(_native._core.supported_isas()) if _native.available() else []
EXAMPLES = int(os.environ.get("CPUATTN_FUZZ_EXAMPLES", "2000"))
DERANDOMIZE = os.environ.get("CPUATTN_FUZZ_RANDOM", "") != "1"

FLOATS = ["float32", "float64", "float16", "bfloat16"]
OTHER_DTYPES = ["int32", "int64", "bool", "complex64", "object", "uint8"]
LAYOUTS = ["c", "fortran", "reversed", "swapped", "broadcast", "strided_last", "misaligned"]
SPECIALS = [None, None, None, "nan", "inf", "-inf", "huge"]

# Valid and invalid values of each option; a recipe corrupts none (most often), one or two.
VALID = {
    "causal": [False, True, "top_left", "bottom_right"],
    "scale": [None, None, 0.5, -1.0, 0.0, 1e3, 2],
    "kv_lengths": [None, None, "valid"],
    "out": [None, None, "fresh", "strided", "alias_q", "alias_v"],
    "num_threads": [None, None, 1, 2, 3],
    "mask": [None, None, "bool", "float"],
}
INVALID = {
    "causal": ["diagonal", None, 1],
    "window": [(1,), "ab", (1.5, 2), (True, 0), 3, (-2, 0)],
    "scale": [float("nan"), float("inf"), "a", True],
    "kv_lengths": ["too_long", "negative", "float", "bad_shape"],
    "out": ["readonly", "wrong_dtype", "wrong_shape", "list"],
    "num_threads": [0, -1, 2.5],
    "mask": ["bad_dtype", "bad_shape"],
}
OPERANDS = ("q", "k", "v")


def any_shape():
    return st.lists(st.integers(0, 4), max_size=6).map(tuple)


def dim(draw, hi):
    """A size in [1, hi], and now and then 0."""
    return 0 if not draw(st.integers(0, 15)) else draw(st.integers(1, hi))


@st.composite
def recipes(draw):
    corrupt = set(
        draw(
            st.lists(
                st.sampled_from(sorted(INVALID) + ["dtype", "shape", "heads", "2d"]), max_size=2
            )
        )
        if draw(st.integers(0, 2)) == 0
        else []
    )
    float_dtype = draw(st.sampled_from(FLOATS))
    batch = tuple(dim(draw, 3) for _ in range(draw(st.integers(0, 3))))
    hkv = dim(draw, 3)
    hq = hkv * draw(st.integers(1, 3))
    if "heads" in corrupt:
        hq = hkv + draw(st.integers(1, 3))
    lq, lk, d = dim(draw, 9), dim(draw, 80), dim(draw, 9)
    dv = draw(st.sampled_from([d, dim(draw, 9)]))
    shapes = {"q": (*batch, hq, lq, d), "k": (*batch, hkv, lk, d), "v": (*batch, hkv, lk, dv)}
    if "2d" in corrupt:  # valid too: one head, no batch
        shapes = {"q": (lq, d), "k": (lk, d), "v": (lk, dv)}
    if "shape" in corrupt:  # one operand of any shape, 0-6 dims
        shapes[draw(st.sampled_from(OPERANDS))] = draw(any_shape())
    ops = {
        n: {
            "dtype": float_dtype,
            "layout": draw(st.sampled_from(LAYOUTS)),
            "special": draw(st.sampled_from(SPECIALS)),
        }
        for n in OPERANDS
    }
    if "dtype" in corrupt:
        ops[draw(st.sampled_from(OPERANDS))]["dtype"] = draw(st.sampled_from(OTHER_DTYPES + FLOATS))

    def option(name):
        return draw(st.sampled_from(INVALID[name] if name in corrupt else VALID[name]))

    full_mask = (*shapes["q"][:-1], shapes["k"][-2] if len(shapes["k"]) >= 2 else 1)
    mask_shape = tuple(n if draw(st.booleans()) else 1 for n in full_mask)
    mask_shape = mask_shape[draw(st.integers(0, len(mask_shape))) :]
    if "mask" in corrupt:
        mask_shape = draw(any_shape())

    window = None
    if "window" in corrupt:
        window = option("window")
    elif draw(st.booleans()):
        window = (draw(st.integers(-1, 12)), draw(st.integers(-1, 12)))
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "isa": draw(st.sampled_from(ISAS)) if ISAS else None,
        "shapes": shapes,
        **ops,
        "mask": option("mask"),
        "mask_shape": mask_shape,
        "mask_dtype": float_dtype,
        "causal": option("causal"),
        "window": window,
        "scale": option("scale"),
        "kv_lengths": option("kv_lengths"),
        "return_lse": draw(st.booleans()),
        "out": option("out"),
        "num_threads": option("num_threads"),
    }


def make_array(rng, shape, spec):
    dtype = BF16 if spec["dtype"] == "bfloat16" else np.dtype(spec["dtype"])
    base = rng.standard_normal(shape) if shape else np.float64(rng.standard_normal())
    if spec["special"] == "huge":
        base = base * 1e4
    arr = np.asarray(base).astype(dtype)
    if (
        (dtype.kind in "fc" or dtype == BF16)
        and arr.size
        and spec["special"] in ("nan", "inf", "-inf")
    ):
        arr.flat[rng.integers(arr.size)] = float(spec["special"])
    return lay_out(rng, arr, spec["layout"])


def lay_out(rng, arr, layout):
    """The same values in memory of another shape: strides negative, zero, non-unit, odd."""
    if arr.ndim == 0:
        return arr
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "reversed":
        return np.ascontiguousarray(arr[::-1])[::-1]
    if layout == "swapped" and arr.ndim >= 2:
        return np.ascontiguousarray(arr.swapaxes(-1, -2)).swapaxes(-1, -2)
    if layout == "broadcast" and arr.shape[0] > 0:
        return np.broadcast_to(arr[:1], arr.shape)  # stride 0 on the first axis
    if layout == "strided_last":
        wide = np.zeros((*arr.shape[:-1], 2 * arr.shape[-1]), arr.dtype)
        wide[..., ::2] = arr
        return wide[..., ::2]
    if layout == "misaligned" and arr.dtype != object and arr.itemsize > 1:
        buf = np.zeros(arr.nbytes + 1, np.uint8)
        view = buf[1:].view(arr.dtype).reshape(arr.shape)
        view[...] = arr
        return view
    return arr


def materialize(r):
    rng = np.random.default_rng(r["seed"])
    q, k, v = (make_array(rng, r["shapes"][n], r[n]) for n in ("q", "k", "v"))
    kw = {
        "causal": r["causal"],
        "window": r["window"],
        "scale": r["scale"],
        "return_lse": r["return_lse"],
        "num_threads": r["num_threads"],
    }

    if r["mask"] in ("bool", "bad_shape"):
        kw["mask"] = rng.random(r["mask_shape"]) > 0.3
    elif r["mask"] == "float":
        kw["mask"] = np.where(
            rng.random(r["mask_shape"]) > 0.2, rng.standard_normal(r["mask_shape"]), -np.inf
        ).astype(BF16 if r["mask_dtype"] == "bfloat16" else r["mask_dtype"])
    elif r["mask"] == "bad_dtype":
        kw["mask"] = rng.integers(0, 2, r["mask_shape"])

    batch = q.shape[:-3]
    lk = k.shape[-2] if k.ndim >= 2 else 0
    lengths = {
        "valid": lambda: rng.integers(0, lk + 1, batch),
        "too_long": lambda: np.full(batch, lk + 1),
        "negative": lambda: np.full(batch, -1),
        "float": lambda: np.zeros(batch, np.float32),
        "bad_shape": lambda: np.zeros((*batch, 2), np.int64),
    }
    if r["kv_lengths"]:
        kw["kv_lengths"] = lengths[r["kv_lengths"]]()

    out_shape = (*q.shape[:-1], v.shape[-1] if v.ndim else 0)
    out_dtype = q.dtype if q.dtype.kind == "f" or q.dtype == BF16 else np.float32
    outs = {
        "fresh": lambda: np.empty(out_shape, out_dtype),
        "strided": lambda: np.empty((*out_shape, 2), out_dtype)[..., 0],
        "alias_q": lambda: q,
        "alias_v": lambda: v,
        "readonly": lambda: _read_only(np.empty(out_shape, out_dtype)),
        "wrong_dtype": lambda: np.empty(out_shape, np.float16),
        "wrong_shape": lambda: np.empty((*out_shape, 1), out_dtype),
        "list": lambda: [0.0],
    }
    if r["out"]:
        kw["out"] = outs[r["out"]]()
    return (q, k, v), kw


def _read_only(a):
    a.flags.writeable = False
    return a


def call(r, backend):
    args, kw = materialize(r)
    try:
        huge = any(r[n]["special"] == "huge" for n in ("q", "k", "v"))
        return cpuattn.attention(*args, backend=backend, **kw), huge
    except (ValueError, TypeError) as exc:
        return type(exc), False


def assert_same(native, ref, huge):
    """Equal NaN and inf positions; finite values within float32 reordering error (looser
    when 1e4-sized inputs make the softmax itself ill-conditioned)."""
    for a, b in zip(
        native if isinstance(native, tuple) else (native,),
        ref if isinstance(ref, tuple) else (ref,),
        strict=True,
    ):
        assert a.shape == b.shape
        assert a.dtype == b.dtype
        dtype = a.dtype
        assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN positions differ"
        assert np.array_equal(np.isinf(a), np.isinf(b)), "inf positions differ"
        a, b = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(b)
        scale = max(1.0, float(np.abs(b[finite]).max())) if finite.any() else 1.0
        # Half outputs: both backends round float32 results, which may differ by one ulp.
        rounding = 2.0**-7 if dtype == BF16 else 2.0**-10 if dtype == np.float16 else 0
        tol = max(5e-3 if huge else 1e-4, 2 * rounding) * scale
        np.testing.assert_allclose(a[finite], b[finite], rtol=0, atol=tol)


@pytest.mark.skipif(not ISAS, reason="native backend not built")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(recipes())
def test_native_returns_what_numpy_returns_or_both_refuse(recipe):
    core = _native._core
    previous = core.isa()
    core.select_isa(recipe["isa"])
    try:
        native, huge = call(recipe, "native")
    finally:
        core.select_isa(previous)
    ref, _ = call(recipe, "numpy")
    if isinstance(ref, type) or isinstance(native, type):
        assert native is ref, f"native gave {native!r}, numpy {ref!r}"
        return
    assert_same(native, ref, huge)
