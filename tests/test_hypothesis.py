"""Hypothesis over shapes and options: native (each ISA) == NumPy backend == float64 reference."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_matches, dense_attention

import cpuattn
from cpuattn import _native

ISAS = list(_native._core.supported_isas()) if _native.available() else []


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2, 3, 4]))
    lq = draw(st.integers(1, 80))
    lk = draw(st.integers(0, 150))
    d = draw(st.integers(1, 40))
    dv = draw(st.sampled_from([d, draw(st.integers(1, 20))]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*batch, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((*batch, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((*batch, hkv, lk, dv)).astype(dtype)
    if draw(st.booleans()):  # a strided view of a (B, L, H, D) buffer
        q = np.ascontiguousarray(q.swapaxes(-2, -3)).swapaxes(-2, -3)
        k = np.ascontiguousarray(k.swapaxes(-2, -3)).swapaxes(-2, -3)

    kw = {"causal": draw(st.sampled_from([False, True, "top_left"]))}
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    if draw(st.booleans()):
        kw["kv_lengths"] = rng.integers(0, lk + 1, size=batch)
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind:
        full = (*batch, hq, lq, lk)
        shape = tuple(n if draw(st.booleans()) else 1 for n in full)
        shape = shape[draw(st.integers(0, len(shape) - 1)) :]
        if mask_kind == "bool":
            kw["mask"] = rng.random(shape) > 0.3
        else:
            kw["mask"] = np.where(rng.random(shape) > 0.2, rng.standard_normal(shape), -np.inf)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(-2, 2, allow_nan=False))
    return dtype, q, k, v, kw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_backends_agree_with_reference(problem):
    dtype, q, k, v, kw = problem
    ref_out, ref_lse = dense_attention(q, k, v, **kw)
    results = {"numpy": cpuattn.attention(q, k, v, backend="numpy", return_lse=True, **kw)}
    core = _native._core
    for isa in ISAS:
        previous = core.isa()
        core.select_isa(isa)
        try:
            results[isa] = cpuattn.attention(q, k, v, backend="native", return_lse=True, **kw)
        finally:
            core.select_isa(previous)
    for out, lse in results.values():
        assert_matches(out, ref_out, dtype)
        assert_matches(lse, ref_lse, dtype, "lse")
