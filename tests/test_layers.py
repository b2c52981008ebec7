"""MultiHeadAttention and KVCache: against torch.nn.MultiheadAttention and plain NumPy."""

import numpy as np
import pytest

import cpuattn

F32 = np.float32


def reference_mha(layer, query, key, value, keep=None):
    """The layer's math spelled out: projections, repeated kv heads, dense softmax."""

    def proj(x, w, b):
        return x @ w.T + (0 if b is None else b)

    b, lq, e = query.shape
    h, hkv, dh = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = proj(query, layer.w_q, layer.b_q).reshape(b, lq, h, dh).transpose(0, 2, 1, 3)
    k = proj(key, layer.w_k, layer.b_k).reshape(b, -1, hkv, dh).transpose(0, 2, 1, 3)
    v = proj(value, layer.w_v, layer.b_v).reshape(b, -1, hkv, dh).transpose(0, 2, 1, 3)
    k, v = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
    s = q.astype(np.float64) @ k.swapaxes(-1, -2) / np.sqrt(dh)
    if keep is not None:
        s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    heads = (p / p.sum(-1, keepdims=True)) @ v
    return proj(heads.transpose(0, 2, 1, 3).reshape(b, lq, e), layer.w_o, layer.b_o)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (8, 1)])
def test_self_attention_with_gqa_matches_reference(rng, heads, kv_heads):
    layer = cpuattn.MultiHeadAttention(64, heads, kv_heads, seed=0)
    layer.b_q[:] = rng.standard_normal(64)
    x = rng.standard_normal((3, 17, 64)).astype(F32)
    causal = np.tril(np.ones((17, 17), bool))
    np.testing.assert_allclose(
        layer(x, causal=True), reference_mha(layer, x, x, x, causal), atol=2e-5
    )


def test_cross_attention_with_kdim_vdim_and_key_mask(rng):
    layer = cpuattn.MultiHeadAttention(32, 4, kdim=24, vdim=40, seed=1)
    q = rng.standard_normal((2, 5, 32)).astype(F32)
    k = rng.standard_normal((2, 9, 24)).astype(F32)
    v = rng.standard_normal((2, 9, 40)).astype(F32)
    keep = rng.random((2, 9)) > 0.3
    keep[:, 0] = True
    got = layer(q, k, v, mask=keep[:, None, None, :])
    np.testing.assert_allclose(
        got, reference_mha(layer, q, k, v, keep[:, None, None, :]), atol=2e-5
    )


def test_kv_cache_decode_equals_full_causal_pass(rng):
    layer = cpuattn.MultiHeadAttention(64, 8, 2, seed=2)
    x = rng.standard_normal((2, 12, 64)).astype(F32)
    full = layer(x, causal=True)
    cache = cpuattn.KVCache(2, 2, 32, 8)
    steps = [layer(x[:, :5], causal=True, cache=cache)]  # prefill 5 tokens, then one by one
    steps += [layer(x[:, t : t + 1], causal=True, cache=cache) for t in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)
    assert cache.lengths.tolist() == [12, 12]


def test_kv_cache_overflow_raises_and_changes_nothing(rng):
    cache = cpuattn.KVCache(1, 2, 4, 3)
    cache.append(np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 3)))
    before = (cache.k.copy(), cache.v.copy(), cache.lengths.copy())
    with pytest.raises(ValueError, match="would pass max_len = 4"):
        cache.append(np.full((1, 2, 2, 3), 7.0), np.full((1, 2, 2, 3), 7.0))
    assert np.array_equal(cache.k, before[0])
    assert np.array_equal(cache.v, before[1])
    assert np.array_equal(cache.lengths, before[2])
    with pytest.raises(ValueError, match=r"k must have shape \(1, 2, T, 3\)"):
        cache.append(np.ones((1, 3, 1, 3)), np.ones((1, 3, 1, 3)))
    cache.reset()
    assert cache.lengths.tolist() == [0]
    cache.append(np.ones((1, 2, 4, 3)), np.ones((1, 2, 4, 3)))  # room again, same buffers
    assert cache.lengths.tolist() == [4]


def test_layer_validates_shapes():
    with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_heads 8"):
        cpuattn.MultiHeadAttention(64, 8, 3)
    with pytest.raises(ValueError, match="embed_dim 30 must be a positive multiple"):
        cpuattn.MultiHeadAttention(30, 4)
    layer = cpuattn.MultiHeadAttention(16, 2)
    with pytest.raises(ValueError, match=r"query: expected \(B, Lq, 16\)"):
        layer(np.zeros((2, 3, 8), F32))


@pytest.mark.parametrize("same_dims", [True, False])
def test_from_torch_matches_torch(rng, same_dims):
    torch = pytest.importorskip("torch", reason="torch not installed")
    torch.manual_seed(0)
    kw = {} if same_dims else {"kdim": 24, "vdim": 40}
    module = torch.nn.MultiheadAttention(32, 4, batch_first=True, **kw).eval()
    layer = cpuattn.MultiHeadAttention.from_torch(module)
    q = rng.standard_normal((2, 7, 32)).astype(F32)
    k = rng.standard_normal((2, 11, 24 if kw else 32)).astype(F32)
    v = rng.standard_normal((2, 11, 40 if kw else 32)).astype(F32)
    padding = np.zeros((2, 11), bool)
    padding[1, 6:] = True  # torch polarity: True = blocked
    with torch.inference_mode():
        expected, _ = module(
            torch.from_numpy(q),
            torch.from_numpy(k),
            torch.from_numpy(v),
            key_padding_mask=torch.from_numpy(padding),
            need_weights=False,
        )
    got = layer(q, k, v, mask=~padding[:, None, None, :])
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-5)
