"""The backward on bfloat16 inputs, on every ISA: with bfloat16 products (the AMX tile unit,
or AVX512-BF16's vdpbf16ps) its five products take bfloat16 operands with float32 sums (P and
dS rounded to bfloat16 on the way, as torch does), elsewhere it runs in float32. Held to the
float64 gradients of the same bfloat16 values: rounded once to bfloat16 plus float32 noise in
float32, plus the rounding of P and dS with bfloat16 products. Shapes cross the 64 x 64 tiles,
the tile unit's 16-row blocks and 32-key chunks, and the vector products' 4-row blocks and
32-column remainders; head dims that are not multiples of 32 take the float32 step on AMX,
and odd ones on every ISA (vdpbf16ps takes any even one, its last vector masked)."""

import numpy as np
import pytest
from conftest import pinned_isa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import random_qkv

import cpuattn
from cpuattn import _native
from cpuattn._request import BF16

pytestmark = pytest.mark.skipif(not _native.available(), reason="no native extension")
ISAS = list(_native._core.supported_isas()) if _native.available() else []

# A bfloat16 result is the float64 one rounded (half an ulp: 2^-8 of the value), plus what the
# computation adds, relative to the largest gradient (or 1, for gradients that cancel to about
# 0): float32 noise, or with bfloat16 products (AMX tiles, AVX512-BF16's vdpbf16ps) P and dS
# rounded to bfloat16. Each of those roundings
# is within 2^-9 of its weight, but a gradient element sums up to L of them, and where the
# terms cancel the sum of their errors can pass 2^-8 of the largest gradient (hypothesis found
# 1.09x that): each element is held to 2^-6 of it (a dropped or wrong term is of the order of
# the gradient itself), and the root mean square error to 2^-8 of the gradients' (measured
# 0.6x that on long sequences): noise, not a wrong term.
ROUNDING = 2.0**-8
NOISE = {"avx512_amx": 2.0**-6, "avx512_bf16": 2.0**-6}  # the ISAs with bfloat16 products
FLOAT32_NOISE = 3e-5


@pytest.fixture(params=ISAS)
def isa(request):
    with pinned_isa(request.param):
        yield request.param


def assert_rounded_once(got, expected):
    """bfloat16 gradients within half an ulp (plus the ISA's noise) of the float64 ones."""
    noise = NOISE.get(_native._core.isa(), FLOAT32_NOISE)
    for name, g, e in zip("qkv", got, expected, strict=True):
        assert g.dtype == BF16, name
        g = g.astype(np.float64)
        assert np.isfinite(g).all(), f"d{name}: not finite"
        scale = max(1.0, np.abs(e).max(initial=0))
        excess = np.abs(g - e) - (ROUNDING * np.abs(e) * (1 + 1e-3) + noise * scale)
        assert excess.max(initial=0) <= 0, f"d{name}: {np.abs(g - e).max():.3g} off at worst"
        if e.size:
            rms = np.sqrt(np.mean((g - e) ** 2))
            assert rms <= ROUNDING * np.sqrt(np.mean(e**2)) + FLOAT32_NOISE * scale, f"d{name}"


def wide_backward(dout, q, k, v, out, lse, **options):
    """The float64 gradients of the same values (the NumPy backend)."""
    wide = [x.astype(np.float64) for x in (dout, q, k, v, out, lse)]
    return cpuattn.attention_backward(*wide, backend="numpy", **options)


def core_backward(q, k, v, dout, grads, *, causal=False, kv_lengths=None, promise=True):
    """_core.attention_backward on float32 (or float64) arrays into grads, with the default
    scale 1 / sqrt(D) and the bf16_inputs promise as given."""
    out, lse = cpuattn.attention(q, k, v, return_lse=True, causal=causal, kv_lengths=kv_lengths)
    delta = np.einsum("...i,...i->...", dout, out)
    scale = 1.0 / np.sqrt(q.shape[-1])
    _native._core.attention_backward(
        q, k, v, dout, lse, delta, *grads, None, kv_lengths, scale, causal, 0, -1, -1, 0, 0.0,
        None, None, None, bf16_inputs=promise,
    )  # fmt: skip


def check(q, k, v, rng, **options):
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(BF16)
    got = cpuattn.attention_backward(dout, q, k, v, out, lse, **options)
    assert_rounded_once(got, wide_backward(dout, q, k, v, out, lse, **options))


SHAPES = {  # (batch, Hq, Hkv, Lq, Lk, D, Dv)
    "one_row": ((2,), 3, 3, 1, 65, 128, 128),
    "odd_lengths": ((1,), 2, 1, 7, 129, 32, 64),
    "tiles_cross": ((2,), 4, 2, 129, 200, 64, 32),
    "lq_gt_lk": ((1,), 2, 2, 130, 70, 96, 96),
    "large_head": ((1,), 1, 1, 80, 100, 256, 256),
    "not_32": ((1,), 2, 2, 70, 90, 40, 80),
}
OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "top_left": {"causal": "top_left"},
    "window": {"causal": True, "window": (50, 0)},
    "softcap_alibi": {"softcap": 3.0, "alibi": True},
    "scale": {"scale": 0.3},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradients_rounded_once(isa, rng, shape, options):
    batch, hq, hkv, lq, lk, d, dv = shape
    q, k, v = random_qkv(rng, batch, hq, hkv, lq, lk, d, dv, dtype=BF16)
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = rng.random(hq) * 0.2
    check((q.astype(np.float32) * 2).astype(BF16), k, v, rng, **options)


def test_lengths_masks_and_gqa_rows(isa, rng):
    """kv_lengths (0, a partial tile, full), a bool mask with a row that keeps nothing, and
    a GQA group whose query tiles interleave heads."""
    q, k, v = random_qkv(rng, (3,), 8, 2, 90, 130, 64, dtype=BF16)
    check(q, k, v, rng, kv_lengths=np.array([0, 65, 130]), causal=True)
    keep = rng.random((90, 130)) < 0.4
    keep[3] = False
    check(q, k, v, rng, mask=keep)


def test_long_query_block(isa, rng):
    """More query tiles in a task than the tile unit keeps prepared (8 MiB: 64 tiles at
    D = 256): their operands are prepared again for each block of 8 tiles."""
    q, k, v = random_qkv(rng, (), 1, 1, 4100, 4100, 256, dtype=BF16)
    check(q, k, v, rng, causal=True)


@pytest.mark.parametrize(("lq", "d"), [(100, 64), (99, 96), (99, 40)])
def test_dq_accumulated_in_place(isa, rng, lq, d):
    """One key chunk and no GQA group, with a float32 dq: dQ is summed in the caller's array
    (the core's path for float32 arrays that hold bfloat16 values). 100 rows leave 4 in the
    last tile's last block of 16 (the tile unit writes whole blocks: through a copy); 99 with
    D = 96 leave 3 past the vector products' 4-row blocks and a 32-column block after 64, with
    D = 40 a masked vector of 8 after 32 (vdpbf16ps only; the tile unit's float32 step). The
    arrays end a guard of NaN short of their buffers: nothing is written past them."""
    q, k, v, dout = (rng.standard_normal((1, 2, n, d)).astype(BF16) for n in (lq, 64, 64, lq))
    wide = [x.astype(np.float32) for x in (q, k, v, dout)]
    buffers = [np.full(x.size + 64, np.nan, np.float32) for x in wide[:3]]
    grads = [b[: x.size].reshape(x.shape) for b, x in zip(buffers, wide, strict=False)]
    core_backward(*wide, grads)
    for b, x in zip(buffers, wide, strict=False):
        assert np.isnan(b[x.size :]).all()
    out, lse = cpuattn.attention(*wide[:3], return_lse=True)  # what core_backward used
    rounded = [g.astype(BF16) for g in grads]
    assert_rounded_once(rounded, wide_backward(dout, q, k, v, out, lse))


# The head dims (d, dv) each ISA's bfloat16 products take (else the float32 step).
def takes_bf16_products(isa, d, dv):
    multiple = {"avx512_amx": 32, "avx512_bf16": 2}.get(isa)
    return multiple is not None and d % multiple == 0 and dv % multiple == 0


@pytest.mark.parametrize(("d", "dv"), [(64, 64), (40, 80), (80, 40), (13, 32)])
def test_bfloat16_products_are_taken(isa, rng, d, dv):
    """The bf16_inputs promise changes the bits exactly where the ISA has bfloat16 products
    for these head dims (P and dS rounded to bfloat16 there), and nothing elsewhere."""
    q, k, v, dout = (
        rng.standard_normal((1, 2, n, e)).astype(BF16).astype(np.float32)
        for n, e in ((70, d), (90, d), (90, dv), (70, dv))
    )
    runs = []
    for promise in (True, False):
        grads = [np.zeros_like(x) for x in (q, k, v)]
        core_backward(q, k, v, dout, grads, promise=promise)
        runs.append(grads)
    same = all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))
    assert same != takes_bf16_products(isa, d, dv)


def test_float32_values_that_are_not_bfloat16(isa, rng):
    """The core's bf16_inputs promise is checked: float32 operands with bits below bfloat16's
    take the float32 step, bit for bit, rather than being truncated."""
    q, k, v, dout = (rng.standard_normal((1, 2, 130, 64), dtype=np.float32) for _ in range(4))
    runs = []
    for promise in (False, True):
        grads = [np.empty_like(x) for x in (q, k, v)]
        core_backward(q, k, v, dout, grads, promise=promise)
        runs.append(grads)
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("grad_dtype", [BF16, np.dtype(np.float16)], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 2, 100, 60), (2, 2, 300, 60), (8, 1, 70, 2000), (8, 1, 300, 100), (2, 2, 0, 50)],
    ids=["in_place", "rows_cut_in_place", "keys_cut", "rows_cut", "no_queries"],
)
def test_half_gradients_are_the_float32_ones_rounded(isa, rng, grad_dtype, shape):
    """The kernel writes half gradients itself: the float32 ones rounded, bit for bit, however
    they are summed (the float32 dQ in place or not, over key chunks, over row blocks; zero
    rows). A NaN's payload may differ from NumPy's rounding (none here)."""
    hq, hkv, lq, lk = shape
    q = rng.standard_normal((1, hq, lq, 64)).astype(BF16).astype(np.float32)
    k, v = (rng.standard_normal((1, hkv, lk, 64)).astype(BF16).astype(np.float32) for _ in "kv")
    dout = rng.standard_normal(q.shape).astype(BF16).astype(np.float32)
    runs = []
    for dtype in (np.float32, grad_dtype):
        grads = [np.full(x.shape, np.nan, dtype) for x in (q, k, v)]
        core_backward(q, k, v, dout, grads, causal=True, kv_lengths=np.array([lk - 7]))
        runs.append(grads)
    for wide, half in zip(*runs, strict=True):
        np.testing.assert_array_equal(half.view(np.uint16), wide.astype(grad_dtype).view(np.uint16))


def test_inf_in_a_kept_value_row(isa, rng):
    """inf in a V row that the queries keep reaches the gradients as on the float32 step."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 70, 90, 32, dtype=BF16)
    v[0, 1, 40, 3] = np.inf
    out, lse = cpuattn.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(BF16)
    got = cpuattn.attention_backward(dout, q, k, v, out, lse)
    with pinned_isa("scalar"):
        expected = cpuattn.attention_backward(dout, q, k, v, out, lse)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(e))


def test_sweeps_of_several_key_tiles(isa, rng):
    """32 (batch, kv head) pairs: no task is cut, so each sweeps its queries with 4 key tiles
    at a time (then the fifth alone), summing dQ over them; lengths end mid-sweep."""
    q, k, v = random_qkv(rng, (4,), 16, 8, 70, 300, 64, dtype=BF16)
    check(q, k, v, rng)
    check(q, k, v, rng, kv_lengths=np.array([300, 250, 130, 0]), causal=True)


def test_strided_views(isa, rng):
    """(B, L, H, D) buffers viewed as (B, H, L, D)."""
    q, k, v = (
        rng.standard_normal((2, n, h, 64)).astype(BF16).swapaxes(1, 2)
        for n, h in ((100, 4), (140, 2), (140, 2))
    )
    check(q, k, v, rng, causal=True)


def test_non_finite_values_where_nothing_reads_them(isa, rng):
    """inf / NaN in K and V rows past kv_lengths and in q rows that keep no key: the gradients
    of zeros there. With bfloat16 products the pairs that hold them take the float32 step
    (which skips what has no weight), the others the bfloat16 products: not the same bits as
    the clean call, whose pairs all take the bfloat16 products, but the same accuracy."""
    q, k, v = (x.astype(np.float32) for x in random_qkv(rng, (2,), 2, 1, 80, 150, 32, dtype=BF16))
    lengths = np.array([100, 150])
    keep = np.ones((80, 150), bool)
    keep[10] = False
    for x in (k, v):
        x[0, :, 100:] = 0
    q[:, :, 10] = 0
    clean = [x.astype(BF16) for x in (q, k, v)]
    dirty = [x.copy() for x in clean]
    dirty[1][0, :, 100:] = np.nan
    dirty[2][0, :, 100:] = np.inf
    dirty[0][:, :, 10] = np.inf
    options = {"kv_lengths": lengths, "mask": keep}
    out, lse = cpuattn.attention(*clean, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(BF16)
    got = cpuattn.attention_backward(dout, *dirty, out, lse, **options)
    assert_rounded_once(got, wide_backward(dout, *clean, out, lse, **options))


def test_same_bits_for_any_thread_count(isa, rng):
    q, k, v = random_qkv(rng, (1,), 4, 2, 300, 333, 64, dtype=BF16)
    out, lse = cpuattn.attention(q, k, v, return_lse=True, causal=True)
    dout = rng.standard_normal(out.shape).astype(BF16)
    runs = [
        cpuattn.attention_backward(dout, q, k, v, out, lse, causal=True, num_threads=n)
        for n in (1, 2, 3)
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_float32_dout_still_matches(isa, rng):
    """A float32 dout is not bfloat16: the float32 step, at float32 accuracy."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 100, 100, 64, dtype=BF16)
    out, lse = cpuattn.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    got = cpuattn.attention_backward(dout, q, k, v, out, lse)
    assert_rounded_once(got, wide_backward(dout, q, k, v, out, lse))


@st.composite
def bf16_problems(draw):
    """Shapes around the tile unit's edges (D and Dv multiples of 32, or not), GQA, masks."""
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    lq, lk = draw(st.integers(1, 150)), draw(st.integers(1, 200))
    d = draw(st.sampled_from([32, 64, 96, 40]))
    dv = draw(st.sampled_from([d, 32, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = random_qkv(rng, (draw(st.integers(1, 2)),), hq, hkv, lq, lk, d, dv, dtype=BF16)
    kw = {"causal": draw(st.sampled_from([False, True, "top_left"]))}
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 60)), draw(st.integers(-1, 60)))
    if draw(st.booleans()):
        kw["mask"] = rng.random((lq, lk)) > 0.3
    return rng, q, k, v, kw


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bf16_problems())
def test_hypothesis_shapes(problem):
    rng, q, k, v, kw = problem
    for isa in ISAS:
        with pinned_isa(isa):
            check(q, k, v, rng, **kw)
