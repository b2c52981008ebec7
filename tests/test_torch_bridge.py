"""cpuattn.torch: the custom ops against torch's SDPA (math backend, float64) and cpuattn's own
NumPy results, forward and backward, plus torch.compile, opcheck, zero-copy views and errors.
Skipped without torch."""

import numpy as np
import pytest

import cpuattn

torch = pytest.importorskip("torch")
F = torch.nn.functional
ct = pytest.importorskip("cpuattn.torch")

DTYPES = {
    "float32": (torch.float32, 2e-6),
    "float64": (torch.float64, 1e-12),
    "float16": (torch.float16, 3e-3),
    "bfloat16": (torch.bfloat16, 2e-2),
}


def leaves(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes
    ]


def reference(q, k, v, **kw):
    """torch's math SDPA in float64 on the same (rounded) values: out and the leaves' grads."""
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw = {**kw, "attn_mask": mask.double()}
    if mask is not None and kw.get("is_causal"):  # torch's math backend refuses both: by hand
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool).tril()
        kw = {**kw, "attn_mask": kw["attn_mask"].masked_fill(~keep, -torch.inf), "is_causal": False}
    out = F.scaled_dot_product_attention(*wide, **kw)
    return out, wide


def assert_close(got, expected, tol, what):
    got, expected = got.detach(), expected.detach()
    err = float((got.double() - expected.double()).abs().max())
    assert err <= tol * max(1.0, float(expected.abs().max())), f"{what}: error {err:.3g}"


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "causal_lq<lk",
        "causal_lq>lk",
        "gqa",
        "bool_mask",
        "float_mask",
        "scale",
        "3d",
        "5d",
        "causal_and_mask",
    ],
)
def test_sdpa_matches_torch(name, case):
    dtype, tol = DTYPES[name]
    shapes = {"3d": ((6, 40, 16), (6, 50, 16), (6, 50, 8)), "5d": ((2, 3, 2, 40, 16),) * 3}
    q, k, v = leaves(
        *shapes.get(case, ((2, 4, 40, 16), (2, 4, 70, 16), (2, 4, 70, 24))), dtype=dtype
    )
    kw: dict = {}
    if case == "causal_lq<lk":
        kw["is_causal"] = True
    elif case == "causal_lq>lk":
        q, k, v = leaves((2, 4, 70, 16), (2, 4, 40, 16), (2, 4, 40, 16), dtype=dtype)
        kw["is_causal"] = True  # top-left: every row keeps key 0
    elif case == "gqa":
        q, k, v = leaves((2, 8, 40, 16), (2, 2, 70, 16), (2, 2, 70, 16), dtype=dtype)
        kw["enable_gqa"] = True
    elif case == "bool_mask":
        keep = torch.rand(4, 40, 70, generator=torch.Generator().manual_seed(1)) < 0.6
        keep[..., 0] = True  # torch's math SDPA gives NaN for a row that keeps nothing
        kw["attn_mask"] = keep
    elif case == "float_mask":
        kw["attn_mask"] = torch.randn(40, 70, dtype=torch.float64).to(dtype)
    elif case == "scale":
        kw["scale"] = 0.3
    elif case == "causal_and_mask":  # torch's default CPU backend applies both
        kw["attn_mask"] = torch.randn(40, 70, dtype=torch.float64).to(dtype)
        kw["is_causal"] = True
    out = ct.scaled_dot_product_attention(q, k, v, **kw)
    assert out.dtype == dtype
    assert out.shape == (*q.shape[:-1], v.shape[-1])
    expected, wide = reference(q, k, v, **kw)
    assert_close(out, expected, tol, "out")
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(dout)
    expected.backward(dout.double())
    for name_, t, w in zip("qkv", (q, k, v), wide, strict=True):
        assert t.grad.dtype == dtype
        assert_close(t.grad, w.grad, tol, f"d{name_}")


@pytest.mark.parametrize(
    "options",
    [
        {"causal": True, "window": (20, 0)},
        {"causal": "top_left", "softcap": 5.0},
        {"kv_lengths": [30, 0]},
        {"alibi_slopes": [0.5, 0.25, 0.1, 0.05], "causal": True},
        {"diagonal": 5, "causal": True},
    ],
    ids=["window", "softcap", "kv_lengths", "alibi", "diagonal"],
)
def test_attention_keywords_match_cpuattn(options):
    q, k, v = leaves((2, 4, 40, 16), (2, 2, 50, 16), (2, 2, 50, 16), dtype=torch.float64)
    tensor_options = {
        key: torch.from_numpy(np.array(val)) if isinstance(val, list) else val
        for key, val in options.items()
    }
    out, lse = ct.attention(q, k, v, return_lse=True, **tensor_options)
    arrays = [t.detach().numpy() for t in (q, k, v)]
    np_options = {
        key: np.array(val) if isinstance(val, list) else val for key, val in options.items()
    }
    exp_out, exp_lse = cpuattn.attention(*arrays, return_lse=True, **np_options)
    np.testing.assert_array_equal(out.detach().numpy(), exp_out)
    np.testing.assert_array_equal(lse.numpy(), exp_lse)
    assert not lse.requires_grad
    dout = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dout)
    expected = cpuattn.attention_backward(dout.numpy(), *arrays, exp_out, exp_lse, **np_options)
    for t, e in zip((q, k, v), expected, strict=True):
        np.testing.assert_array_equal(t.grad.numpy(), e)


def test_fully_masked_rows_give_zero():
    q, k, v = leaves((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8))
    keep = torch.ones(5, 6, dtype=torch.bool)
    keep[2] = False
    out = ct.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.all(out[:, :, 2] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.all(q.grad[:, :, 2] == 0)


def test_views_share_memory_bfloat16_included():
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(3, 8, 16, dtype=torch.float32).to(dtype).transpose(0, 1)  # strided
        a = ct._numpy(t)
        assert a.shape == tuple(t.shape)
        assert a.__array_interface__["data"][0] == t.data_ptr()
        assert np.array_equal(np.asarray(a, np.float32), t.float().numpy())


def test_compile_fullgraph_forward_and_backward():
    def loss(q, k, v):
        return ct.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()

    q, k, v = leaves((2, 4, 64, 32), (2, 4, 64, 32), (2, 4, 64, 32))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loss(q, k, v).backward()
    for g, t in zip(got, (q, k, v), strict=True):
        torch.testing.assert_close(g, t.grad)


def test_opcheck_both_ops():
    from torch.library import opcheck

    q, k, v = leaves((2, 4, 33, 16), (2, 2, 40, 16), (2, 2, 40, 8))
    lengths = torch.tensor([40, 17])
    sinks = torch.randn(4, requires_grad=True)
    args = (q, k, v, None, "bottom_right", 10, 0, None, 0.2, lengths, 3.0, None, sinks)
    for result in opcheck(torch.ops.cpuattn.attention.default, args).values():
        assert result == "SUCCESS"
    out, lse = torch.ops.cpuattn.attention(*args)
    dout = torch.randn(out.shape)
    back = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, *args[3:12])
    for result in opcheck(torch.ops.cpuattn.attention_backward.default, back).values():
        assert result == "SUCCESS"


def test_bad_inputs_raise_clear_errors():
    q, k, v = leaves((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16))
    sdpa = ct.scaled_dot_product_attention
    with pytest.raises(ValueError, match="^dropout_p"):
        sdpa(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="^key: 2 heads, expected query's 4 or 1; pass enable_gqa"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match="^attn_mask: requires grad"):
        sdpa(q, q, q, attn_mask=torch.zeros(8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="^query: cpuattn runs on CPU tensors"):
        sdpa(q.detach().to("meta"), q, q)
    with pytest.raises(TypeError, match="^query: expected float32"):
        sdpa(torch.ones(2, 8, 4, dtype=torch.int32), q, q)
    with pytest.raises(TypeError, match="^key: expected query's dtype"):
        sdpa(q, q.double(), q)
    with pytest.raises(ValueError, match="^causal"):
        ct.attention(q, q, q, causal="up")
    with pytest.raises(TypeError, match="^causal"):
        ct.attention(q, q, q, causal=1)
    with pytest.raises(TypeError, match=r"^window\[0\]"):
        ct.attention(q, q, q, window=(2.7, 0))
    with pytest.raises(ValueError, match="^window: expected"):
        ct.attention(q, q, q, window=(1, 2, 3))
    with pytest.raises(ValueError, match="^query, key, value: batch dims do not broadcast"):
        sdpa(q, torch.randn(3, 4, 8, 16), torch.randn(3, 4, 8, 16))
    with pytest.raises(ValueError, match="^k: expected"):  # cpuattn's own validation
        ct.attention(q, k[..., :4], v)
    # ... named as torch names them through scaled_dot_product_attention (found in review)
    with pytest.raises(ValueError, match=r"^key: expected \(\.\.\., Hkv, Lk, 16\)"):
        sdpa(q, q[..., :4], q)
    with pytest.raises(ValueError, match=r"^attn_mask: shape \(5, 5\) does not broadcast"):
        sdpa(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="^query: expected a dense"):
        sdpa(q.detach().to_sparse(), q, q)


def test_untracked_calls_skip_the_op_dispatch_with_the_same_results():
    """No gradient to track (inference): the kernel is called straight away, same bits; and
    compiled code records the op even then (fullgraph: a NumPy call would break the graph)."""
    q, k, v = leaves((2, 4, 30, 16), (2, 2, 50, 16), (2, 2, 50, 16))
    tracked, lse = ct.attention(q, k, v, causal=True, softcap=4.0, return_lse=True)
    with torch.no_grad():
        plain, plain_lse = ct.attention(q, k, v, causal=True, softcap=4.0, return_lse=True)
        sdpa = ct.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        compiled = torch.compile(
            lambda q, k, v: ct.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            fullgraph=True,
            backend="aot_eager",
        )(q, k, v)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, tracked.detach(), rtol=0, atol=0)
    torch.testing.assert_close(plain_lse, lse, rtol=0, atol=0)
    expected = ct.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(sdpa, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(
        compiled, ct.scaled_dot_product_attention(q, k, v, enable_gqa=True).detach()
    )


def test_batch_dims_broadcast_as_in_torch():
    """Batch dims of size 1 broadcast (as expanded views), and one kv head is a broadcast too,
    with or without enable_gqa."""
    q, k, v = leaves((2, 4, 5, 8), (1, 4, 6, 8), (1, 4, 6, 8), dtype=torch.float64)
    torch.testing.assert_close(
        ct.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    )
    q, k, v = leaves((3, 2, 4, 5, 8), (3, 1, 1, 6, 8), (3, 1, 1, 6, 8), dtype=torch.float64)
    out = ct.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert k.grad.shape == k.shape


@pytest.mark.parametrize(
    ("q_shape", "kv_shape"),
    [
        ((2, 4, 5, 8), (4, 6, 8)),  # fewer dims: leading ones, as torch
        ((4, 5, 8), (2, 4, 6, 8)),
        ((5, 8), (2, 4, 6, 8)),
        ((2, 1, 5, 8), (2, 4, 6, 8)),  # one query head broadcasts over key's 4
        ((1, 5, 8), (3, 6, 8)),
    ],
    ids=str,
)
def test_inputs_of_other_dims_and_one_query_head_broadcast_as_in_torch(q_shape, kv_shape):
    """torch's SDPA broadcasts every leading dim, heads included, and prepends ones to inputs
    of fewer dims; the bridge refused these (found in review). Forward and gradients."""
    q, k, v = leaves(q_shape, kv_shape, kv_shape, dtype=torch.float64)
    out = ct.scaled_dot_product_attention(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


def test_one_key_or_value_head_broadcasts_over_the_other():
    """torch broadcasts key's and value's heads separately; one head against several is a
    broadcast (an expanded view), other differing counts are refused (found in review)."""
    for k_heads, v_heads in ((1, 4), (4, 1)):
        q, k, v = leaves((2, 4, 5, 8), (2, k_heads, 6, 8), (2, v_heads, 6, 8), dtype=torch.float64)
        out = ct.scaled_dot_product_attention(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, expected)
        got, want = (torch.autograd.grad(o.sum(), (q, k, v)) for o in (out, expected))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    q, k, v = leaves((4, 3, 4), (2, 5, 4), (4, 5, 4))
    with pytest.raises(ValueError, match="^value: 4 heads against key's 2"):
        ct.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_negated_bfloat16_view():
    """A bfloat16 tensor with its negative bit set (torch._neg_view) is resolved before its
    bits are viewed as int16, which view() refuses (found in review)."""
    q = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    out = ct.scaled_dot_product_attention(torch._neg_view(q), q, q)
    torch.testing.assert_close(out, ct.scaled_dot_product_attention(-q, q, q), rtol=0, atol=0)


def test_mask_requiring_grad_is_fine_without_grad_mode():
    q = torch.randn(1, 2, 4, 8)
    bias = torch.zeros(4, 4, requires_grad=True)
    with torch.no_grad():
        ct.scaled_dot_product_attention(q, q, q, attn_mask=bias)


def test_autocast_runs_in_bfloat16_like_torch():
    """Under autocast a model's rotary code hands over float32 q and k beside bfloat16 v."""
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    v = torch.randn(2, 4, 16, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jit.trace / jit.script
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks
def test_tracers_record_the_op_not_a_constant():
    """jit.trace with no gradient: the graph calls the op, so new inputs give new results;
    forward AD has no formula: an error, never a silent None tangent."""
    q = torch.randn(1, 2, 6, 8)

    def f(q):
        return ct.scaled_dot_product_attention(q, q, q, is_causal=True)

    with torch.no_grad():
        traced = torch.jit.trace(f, (q,))
    assert "cpuattn::attention" in str(traced.graph)
    other = torch.randn(1, 2, 6, 8)
    torch.testing.assert_close(traced(other), f(other))
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(fwad.make_dual(q, torch.ones_like(q)))


def test_sinks_and_their_gradient_match_the_formula():
    """gpt-oss's sink: a logit per head beside the keys, dropped after the softmax."""
    q, k, v = leaves((2, 4, 9, 8), (2, 2, 11, 8), (2, 2, 11, 8), dtype=torch.float64)
    (sinks,) = leaves((4,), dtype=torch.float64)
    out = ct.attention(q, k, v, causal=True, sinks=sinks)
    dout = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dout)
    got = [t.grad.clone() for t in (q, k, v, sinks)]

    wide = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    kk, vv = (x.repeat_interleave(2, dim=1) for x in wide[1:3])
    s = wide[0] @ kk.transpose(-1, -2) / 8**0.5
    keep = torch.ones(9, 11, dtype=torch.bool).tril(diagonal=2)  # bottom-right
    s = s.masked_fill(~keep, -torch.inf)
    column = wide[3].reshape(1, 4, 1, 1).expand(2, 4, 9, 1)
    p = torch.softmax(torch.cat([s, column], dim=-1), dim=-1)[..., :-1]
    expected = p @ vv
    expected.backward(dout)
    torch.testing.assert_close(out.detach(), expected.detach())
    for name, g, w in zip(("q", "k", "v", "sinks"), got, wide, strict=True):
        torch.testing.assert_close(g, w.grad, msg=name)


def test_docstring_examples():
    import doctest

    failures, tried = doctest.testmod(ct, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 8
    assert failures == 0


@pytest.mark.parametrize("spec", [3, [0, 1, 30], np.array([2, 40]), "tensor"])
def test_global_tokens_forward_backward_and_compile(spec):
    """Hybrid attention through the op: the dense torch reference (a bool mask of the kept
    pairs), gradients included, and torch.compile(fullgraph) with an int, a list, an array
    or a tensor of positions."""
    positions = torch.tensor([5, 44]) if isinstance(spec, str) else spec
    q, k, v = leaves((2, 4, 33, 16), (2, 2, 50, 16), (2, 2, 50, 8), dtype=torch.float64)
    options = {"causal": True, "window": (4, 0), "global_tokens": positions}
    out = ct.attention(q, k, v, **options)
    dout = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dout)
    got = [t.grad.clone() for t in (q, k, v)]

    g = np.arange(spec) if isinstance(spec, int) else np.asarray(positions)
    i, j = np.arange(33)[:, None] + 50 - 33, np.arange(50)[None, :]
    keep = (j <= i) & ((j >= i - 4) | np.isin(j, g) | np.isin(i, g))
    wide = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(
        *wide, attn_mask=torch.from_numpy(keep), enable_gqa=True
    )
    expected.backward(dout)
    torch.testing.assert_close(out.detach(), expected.detach())
    for name, grad, w in zip("qkv", got, wide, strict=True):
        torch.testing.assert_close(grad, w.grad, msg=name)

    compiled = torch.compile(
        lambda a, b, c: ct.attention(a, b, c, **options), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(q, k, v), out)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (True, TypeError),
        ("4", TypeError),
        (2.5, TypeError),
        ([0.5], TypeError),
        ([True, 2], TypeError),
        ({0, 1}, TypeError),
        ([0, None], TypeError),
        ([3, 1], ValueError),
        ([0, 2**70], ValueError),
        (-1, ValueError),
        (torch.tensor([0.5]), TypeError),
    ],
    ids=str,
)
def test_global_tokens_bad_input(spec, error):
    q, k, v = leaves((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4))
    with pytest.raises(error, match="global_tokens"):
        ct.attention(q, k, v, window=(2, 0), global_tokens=spec)


def test_global_tokens_huge_count_is_every_position():
    q, k, v = leaves((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4))
    out = ct.attention(q, k, v, causal=True, window=(2, 0), global_tokens=2**70)
    torch.testing.assert_close(out, ct.attention(q, k, v, causal=True))
    out.sum().backward()


def test_window_sides_past_int64_are_unbounded_on_every_path():
    """A side of 2**63 or more is unbounded, as in cpuattn.attention: the plain eager call
    took it, the op (gradients, torch.compile) once refused it for its int64 argument (found
    in review)."""
    q, k, v = leaves((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8))
    expected = ct.attention(q.detach(), k.detach(), v.detach(), window=(-1, 0))
    for track in (False, True):
        q.requires_grad_(track)
        out = ct.attention(q, k, v, window=(2**63, 0))
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
