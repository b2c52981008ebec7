"""The native backward against the NumPy one (its executable specification) on every ISA, on
shapes that cross the native tiles (64 query rows x 64 keys) and cut the keys into chunks:
odd lengths and head dims, GQA, every masking option, strided and broadcast operands, and
non-finite values where no kept pair reads them."""

import numpy as np
import pytest
from conftest import pinned_isa
from reference import random_qkv

import cpuattn
from cpuattn import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason="no native extension")
ISAS = list(_native._core.supported_isas()) if _native.available() else []


@pytest.fixture(params=ISAS)
def isa(request):
    with pinned_isa(request.param):
        yield request.param


def compare(q, k, v, rng, atol=None, **options):
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    got = cpuattn.attention_backward(dout, q, k, v, out, lse, backend="native", **options)
    expected = cpuattn.attention_backward(dout, q, k, v, out, lse, backend="numpy", **options)
    for name, g, e, x in zip("qkv", got, expected, (q, k, v), strict=True):
        assert g.shape == x.shape, name
        assert g.dtype == x.dtype, name
        assert np.isfinite(g).all(), f"d{name}: not finite"
        scale = max(1.0, float(np.abs(e).max(initial=0)))
        tol = atol if atol is not None else (1e-12 if x.dtype == np.float64 else 3e-5)
        err = float(np.abs(g.astype(np.float64) - e).max(initial=0))
        assert err <= tol * scale, f"d{name}: error {err:.3g}"
    return got


SHAPES = {  # (batch, Hq, Hkv, Lq, Lk, D, Dv)
    "one_row": ((2,), 2, 1, 1, 129, 40, 40),
    "odd": ((1,), 3, 3, 7, 129, 13, 13),
    "tiles_cross": ((2,), 4, 2, 129, 200, 80, 24),
    "lq_gt_lk": ((1,), 6, 2, 150, 70, 40, 56),
    "large_head": ((1,), 2, 1, 70, 90, 256, 256),
    "long_one_head": ((), 1, 1, 300, 1500, 16, 16),  # keys cut into chunks
}
OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "top_left": {"causal": "top_left"},
    "window": {"causal": True, "window": (50, 0)},
    "two_sided": {"window": (30, 70)},
    "diagonal": {"causal": True, "diagonal": 17},
    "softcap_alibi": {"softcap": 3.0, "alibi": True},
    "scale": {"scale": 0.3},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_matches_numpy(isa, rng, shape, options, dtype):
    batch, hq, hkv, lq, lk, d, dv = shape
    q, k, v = random_qkv(rng, batch, hq, hkv, lq, lk, d, dv, dtype=dtype)
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = rng.random(hq) * 0.2
    compare(q * 2, k, v, rng, **options)


def test_kv_lengths_and_masks(isa, rng):
    """Per-entry lengths (0, partial tile, full) and bool / float masks broadcast over heads
    and batch, with rows that keep no key."""
    q, k, v = random_qkv(rng, (3,), 4, 2, 90, 130, 24)
    compare(q, k, v, rng, kv_lengths=np.array([0, 65, 130]), causal=True)
    keep = rng.random((90, 130)) < 0.4
    keep[3] = False
    compare(q, k, v, rng, mask=keep)
    bias = np.where(
        rng.random((3, 1, 90, 130)) < 0.2, -np.inf, rng.standard_normal((3, 1, 90, 130))
    )
    compare(q, k, v, rng, mask=bias.astype(np.float32), window=(40, 40))


def test_strided_operands(isa, rng):
    """(B, L, H, D) buffers as (B, H, L, D) views, a reversed dout, and a mask of stride 0."""
    q = rng.standard_normal((2, 100, 4, 32)).astype(np.float32).swapaxes(1, 2)
    k = rng.standard_normal((2, 140, 2, 32)).astype(np.float32).swapaxes(1, 2)
    v = rng.standard_normal((2, 140, 2, 32)).astype(np.float32)[..., ::-1].swapaxes(1, 2)
    keep = np.broadcast_to(rng.random(140) < 0.7, (2, 4, 100, 140))
    compare(q, k, v, rng, mask=keep, causal=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs(isa, rng, dtype):
    from cpuattn._request import BF16

    t = BF16 if dtype == "bfloat16" else np.float16
    q, k, v = random_qkv(rng, (1,), 4, 2, 100, 150, 32, dtype=t)
    compare(q, k, v, rng, atol=1e-2, causal=True)


def test_non_finite_values_where_nothing_reads_them(isa, rng):
    """inf / NaN in K and V rows past kv_lengths and in q rows that keep no key: the same
    gradients as with zeros there."""
    q, k, v = random_qkv(rng, (2,), 2, 1, 80, 150, 16)
    lengths = np.array([100, 150])
    keep = np.ones((80, 150), bool)
    keep[10] = False
    clean = [x.copy() for x in (q, k, v)]
    for x in clean[1:]:
        x[0, :, 100:] = 0
    clean[0][:, :, 10] = 0
    dirty = [x.copy() for x in clean]
    dirty[1][0, :, 100:] = np.nan
    dirty[2][0, :, 100:] = np.inf
    dirty[0][:, :, 10] = np.inf
    options = {"kv_lengths": lengths, "mask": keep}
    out, lse = cpuattn.attention(*clean, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    expected = cpuattn.attention_backward(dout, *clean, out, lse, backend="native", **options)
    got = cpuattn.attention_backward(dout, *dirty, out, lse, backend="native", **options)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("lq", [0, 90])
def test_every_key_gradient_is_written(lq):
    """The kernel writes every element of dk and dv (0 for keys no query keeps: skipped
    tiles, keys past kv_lengths, no queries at all), whatever the arrays held before."""
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, (2,), 2, 1, lq, 300, 16)
    lengths = np.array([100, 300])
    options = {"causal": True, "window": (20, 0), "kv_lengths": lengths}
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    delta = np.einsum("...i,...i->...", out, out)
    grads = [np.full(x.shape, np.nan, np.float32) for x in (q, k, v)]
    left, right = 20, 0
    _native._core.attention_backward(
        q, k, v, out, lse, delta, *grads, None, lengths, 0.25, True, 0, left, right, 0, 0.0,
        None, None,
    )  # fmt: skip
    expected = cpuattn.attention_backward(
        out, q, k, v, out, lse, backend="numpy", scale=0.25, **options
    )
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=3e-5 * max(1.0, np.abs(e).max(initial=0)))
