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


def snapshot(cache):
    return cache.k.copy(), cache.v.copy(), cache.lengths.copy()


def assert_unchanged(cache, before):
    assert np.array_equal(cache.k, before[0])
    assert np.array_equal(cache.v, before[1])
    assert np.array_equal(cache.lengths, before[2])


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        ({"mask": np.ones((3, 3), bool)}, ValueError, r"mask: shape \(3, 3\) does not broadcast"),
        ({"window": (1.5, 0)}, TypeError, r"window\[0\]: expected an int >= -1, got float 1.5"),
        ({"causal": "yes"}, ValueError, r"causal: expected"),
        ({"kv_lengths": [5, 5]}, ValueError, r"kv_lengths: must be None with cache="),
        ({"x": np.zeros((2, 5, 64), np.int64)}, TypeError, r"query: expected a float"),
        ({"x": np.zeros((2, 5, 32), F32)}, ValueError, r"query: expected \(B, Lq, 64\)"),
        (
            {"x": np.zeros((3, 5, 64), F32)},
            ValueError,
            r"cache: expected KVCache\(batch=3, num_kv_heads=2, max_len, head_dim=8\)",
        ),
        ({"x": np.zeros((2, 30, 64), F32)}, ValueError, r"cache: 30 new positions .* max_len"),
        (
            {"cache": (2, 4, 32, 8)},
            ValueError,
            r"cache: expected KVCache\(batch=2, num_kv_heads=2, .*got batch=2, num_kv_heads=4",
        ),
        (
            {"cache": (2, 2, 32, 16)},
            ValueError,
            r"cache: expected .*head_dim=8\).*got .*head_dim=16",
        ),
        ({"cache_dtype": np.float64}, TypeError, r"cache: dtype float64 does not go with"),
        ({"cache": "not a cache"}, TypeError, r"cache: expected a cpuattn.KVCache"),
    ],
    ids=[
        "mask",
        "window",
        "causal",
        "kv_lengths",
        "int-x",
        "x-embed",
        "x-batch",
        "cache-full",
        "cache-heads",
        "cache-head-dim",
        "cache-dtype",
        "not-a-cache",
    ],
)
def test_failing_layer_call_leaves_the_cache_unchanged(rng, bad, exc, match):
    """Everything is validated before the cache is touched: a retry sees the same cache."""
    layer = cpuattn.MultiHeadAttention(64, 8, 2, seed=2)
    cache = cpuattn.KVCache(2, 2, 32, 8)
    layer(rng.standard_normal((2, 4, 64)).astype(F32), causal=True, cache=cache)
    bad = dict(bad)
    x = bad.pop("x", rng.standard_normal((2, 5, 64)).astype(F32))
    target = cache
    if "cache" in bad:
        spec = bad.pop("cache")
        target = cpuattn.KVCache(*spec) if isinstance(spec, tuple) else spec
    if "cache_dtype" in bad:
        target = cpuattn.KVCache(2, 2, 32, 8, dtype=bad.pop("cache_dtype"))
    kw = {"causal": True, **bad}
    caches = [c for c in {id(c): c for c in (cache, target)}.values() if hasattr(c, "lengths")]
    before = [snapshot(c) for c in caches]
    with pytest.raises(exc, match=match):
        layer(x, cache=target, **kw)
    for c, b in zip(caches, before, strict=True):
        assert_unchanged(c, b)


def test_float64_input_is_cast_to_the_layer_dtype(rng):
    """np.random.randn gives float64: the float32 layer casts it (documented), cache or not."""
    layer = cpuattn.MultiHeadAttention(64, 8, 2, seed=2)
    x = rng.standard_normal((2, 5, 64))  # float64
    cache, cache32 = cpuattn.KVCache(2, 2, 32, 8), cpuattn.KVCache(2, 2, 32, 8)
    got = layer(x, causal=True, cache=cache)
    expected = layer(x.astype(F32), causal=True, cache=cache32)
    assert got.dtype == F32
    assert np.array_equal(got, expected)
    assert cache.lengths.tolist() == [5, 5]
    assert np.array_equal(cache.k, cache32.k)
    no_cache = layer(x, causal=True)
    assert no_cache.dtype == F32
    assert np.array_equal(no_cache, layer(x.astype(F32), causal=True))
    # A float64 layer keeps float64; a float16 cache under a float32 layer is a half KV cache.
    layer64 = cpuattn.MultiHeadAttention(64, 8, 2, seed=2, dtype=np.float64)
    assert layer64(x, causal=True).dtype == np.float64
    half = cpuattn.KVCache(2, 2, 32, 8, dtype=np.float16)
    np.testing.assert_allclose(layer(x, causal=True, cache=half), expected, atol=2e-2)


@pytest.mark.parametrize(
    ("k", "exc", "match"),
    [
        (np.ones((1, 2, 1, 3), np.complex64), TypeError, r"KVCache.append: k: expected real"),
        (np.array([[[["a", "b", "c"]]] * 2]), TypeError, r"KVCache.append: k: expected real"),
        (np.ones((1, 3, 1, 3)), ValueError, r"k must have shape \(1, 2, T, 3\)"),
    ],
    ids=["complex", "str", "shape"],
)
def test_failing_append_changes_nothing(k, exc, match):
    cache = cpuattn.KVCache(1, 2, 4, 3)
    cache.append(np.ones((1, 2, 1, 3)), np.ones((1, 2, 1, 3)))
    before = snapshot(cache)
    with pytest.raises(exc, match=match):
        cache.append(k, np.ones(k.shape))
    assert_unchanged(cache, before)
    with pytest.raises(TypeError, match=r"KVCache.append: v: expected real"):
        cache.append(np.ones((1, 2, 1, 3)), np.ones((1, 2, 1, 3), np.complex64))
    assert_unchanged(cache, before)


def test_sizes_follow_the_type_value_rule():
    """TypeError for a wrong type (floats, bools, non-float dtypes), ValueError for a wrong
    value; NumPy integers work like Python ints."""
    cache = cpuattn.KVCache(np.int64(1), np.int32(2), np.array(100), 64)
    assert cache.k.shape == (1, 2, 100, 64)
    assert cache.v.shape == (1, 2, 100, 64)
    with pytest.raises(TypeError, match=r"KVCache: max_len: expected an int >= 0, got float 100.0"):
        cpuattn.KVCache(1, 2, 100.0, 64)
    with pytest.raises(TypeError, match=r"KVCache: batch: expected an int >= 0, got bool True"):
        cpuattn.KVCache(True, 2, 100, 64)
    with pytest.raises(ValueError, match=r"KVCache: value_dim must be >= 0, got -1"):
        cpuattn.KVCache(1, 2, 100, 64, value_dim=-1)
    with pytest.raises(TypeError, match=r"KVCache: dtype must be float32, .*got int32"):
        cpuattn.KVCache(1, 2, 100, 64, dtype=np.int32)
    with pytest.raises(TypeError, match=r"KVCache: dtype must be float32, .*got 'bogus'"):
        cpuattn.KVCache(1, 2, 100, 64, dtype="bogus")
    layer = cpuattn.MultiHeadAttention(np.int64(64), np.int64(4), seed=0)
    assert layer.w_q.shape == (64, 64)
    with pytest.raises(
        TypeError, match=r"MultiHeadAttention: embed_dim: expected an int, got float 64.0"
    ):
        cpuattn.MultiHeadAttention(64.0, 4)
    with pytest.raises(
        TypeError, match=r"MultiHeadAttention: num_kv_heads: expected an int, got float"
    ):
        cpuattn.MultiHeadAttention(64, 4, 2.0)
    with pytest.raises(TypeError, match=r"MultiHeadAttention: kdim: expected an int, got str '32'"):
        cpuattn.MultiHeadAttention(64, 4, kdim="32")
    with pytest.raises(TypeError, match=r"MultiHeadAttention: dtype must be float32, .*int32"):
        cpuattn.MultiHeadAttention(64, 4, dtype=np.int32)
    with pytest.raises(TypeError, match=r"MultiHeadAttention: w_q must be a float32, .*int64"):
        cpuattn.MultiHeadAttention.from_arrays(*[np.ones((8, 8), np.int64)] * 4, num_heads=2)
    with pytest.raises(TypeError, match=r"from_torch: expected a torch.nn.MultiheadAttention"):
        cpuattn.MultiHeadAttention.from_torch(layer)


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
