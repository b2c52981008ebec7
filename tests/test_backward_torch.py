"""``attention_backward`` (each backend and ISA) against torch autograd of the math SDPA
(skipped without torch), on shapes that span several tiles so tile skipping under causal /
window / kv_lengths is exercised."""

import numpy as np
import pytest
from reference import random_qkv

import cpuattn

torch = pytest.importorskip("torch")
F = torch.nn.functional
SDPBackend = pytest.importorskip("torch.nn.attention").SDPBackend
sdpa_kernel = pytest.importorskip("torch.nn.attention").sdpa_kernel


def kept_and_bias(lq, lk, hq, lengths, causal=False, window=None, alibi_slopes=None):
    """(B, 1 or Hq, Lq, Lk) float bias: -inf where a pair is not kept, minus ALiBi's term."""
    n_keys = np.asarray(lengths).reshape(-1, 1, 1, 1)
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    off = 0 if causal == "top_left" else n_keys - lq
    keep = j < n_keys
    if causal:
        keep = keep & (j <= i + off)
    if window is not None:
        left, right = window
        keep = keep & ((left < 0) | (j >= i + off - left)) & ((right < 0) | (j <= i + off + right))
    bias = np.zeros(keep.shape)
    if alibi_slopes is not None:
        bias = -np.asarray(alibi_slopes).reshape(1, hq, 1, 1) * np.abs(i + off - j)
    return np.where(keep, bias, -np.inf)


def torch_grads(q, k, v, dout, bias, scale=None, softcap=None):
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    if softcap is None:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=torch.tensor(bias), scale=scale, enable_gqa=True
            )
    else:  # SDPA has no softcap: the same math by hand
        group = q.shape[-3] // k.shape[-3]
        s = tq @ tk.repeat_interleave(group, -3).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        s = softcap * torch.tanh(s / softcap) + torch.tensor(bias)
        out = torch.softmax(s, -1) @ tv.repeat_interleave(group, -3)
    out.backward(torch.tensor(dout))
    return [t.grad.numpy() for t in (tq, tk, tv)]


CASES = {
    "dense": {},
    "causal": {"causal": True},
    "top_left": {"causal": "top_left"},
    "sliding_window": {"causal": True, "window": (100, 0)},
    "two_sided_window": {"window": (40, 70)},
    "kv_lengths": {"kv_lengths": np.array([300, 210])},
    "alibi": {"causal": True, "alibi_slopes": np.array([0.25, 0.125, 0.0625, 0.03125])},
    "softcap": {"softcap": 2.0, "window": (150, 10)},
    "scale": {"scale": 0.3, "causal": True},
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_matches_torch_autograd(backward, rng, options, dtype):
    q, k, v = random_qkv(rng, (2,), 4, 2, 200, 300, 16, dv=24, dtype=dtype)
    q = q * 2  # peaked weights
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = backward(dout, q, k, v, out, lse, **options)

    mask_options = {x: options[x] for x in ("causal", "window", "alibi_slopes") if x in options}
    lengths = options.get("kv_lengths", np.array([300, 300]))
    bias = kept_and_bias(200, 300, 4, lengths, **mask_options)
    wide = [x.astype(np.float64) for x in (q, k, v, dout)]
    expected = torch_grads(*wide, bias, options.get("scale"), options.get("softcap"))
    tolerance = 1e-12 if dtype == np.float64 else 2e-5
    for name, g, e in zip("qkv", got, expected, strict=True):
        err = np.abs(g - e).max()
        assert err <= tolerance * np.abs(e).max(), f"d{name}: error {err:.3g}"


def test_mask_matches_torch_autograd(backward, rng):
    """A bool mask (every row keeps a key, as torch needs) and a float mask, with GQA."""
    q, k, v = random_qkv(rng, (2,), 4, 1, 150, 280, 8, dtype=np.float64)
    keep = rng.random((2, 4, 150, 280)) < 0.5
    keep[..., 0] = True
    float_mask = rng.standard_normal((150, 280))
    for mask, bias in ((keep, np.where(keep, 0.0, -np.inf)), (float_mask, float_mask)):
        out, lse = cpuattn.attention(q, k, v, mask=mask, return_lse=True)
        dout = rng.standard_normal(out.shape)
        got = backward(dout, q, k, v, out, lse, mask=mask)
        for g, e in zip(got, torch_grads(q, k, v, dout, bias), strict=True):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-12 * np.abs(e).max())
