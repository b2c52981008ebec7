"""cpuattn against torch.nn.functional.scaled_dot_product_attention (skipped without torch)."""

import numpy as np
import pytest
from reference import assert_matches, random_qkv

torch = pytest.importorskip("torch")
F = torch.nn.functional


def sdpa(q, k, v, **kw):
    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*t, **kw).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("lq", "lk", "d"), [(1, 1, 8), (7, 129, 13), (129, 7, 80), (200, 200, 64), (33, 70, 256)]
)
def test_plain_and_top_left_causal(attention, rng, dtype, lq, lk, d):
    q, k, v = random_qkv(rng, (2,), 4, 4, lq, lk, d, dtype=dtype)
    assert_matches(attention(q, k, v), sdpa(q, k, v), dtype)
    if lq <= lk:  # torch gives NaN for rows that see no key; cpuattn gives 0
        assert_matches(attention(q, k, v, causal="top_left"), sdpa(q, k, v, is_causal=True), dtype)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(attention, rng, kind):
    q, k, v = random_qkv(rng, (2,), 4, 4, 20, 50, 16)
    mask = rng.random((2, 1, 20, 50)) > 0.3
    mask[..., 0] = True  # torch returns NaN for fully-masked rows
    if kind == "float":
        mask = np.where(mask, rng.standard_normal(mask.shape), -np.inf).astype(np.float32)
    t_mask = torch.from_numpy(mask)
    assert_matches(attention(q, k, v, mask=mask), sdpa(q, k, v, attn_mask=t_mask), np.float32)


def test_gqa_and_scale(attention, rng):
    q, k, v = random_qkv(rng, (2,), 8, 2, 30, 40, 16)
    expected = sdpa(q, k, v, enable_gqa=True, scale=0.3)
    assert_matches(attention(q, k, v, scale=0.3), expected, np.float32)
