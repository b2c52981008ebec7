"""return_weights: the softmax weights actually used, and the heatmap that draws them."""

import numpy as np
import pytest
from reference import dense_attention, random_qkv

F32 = np.float32


def reference_weights(q, k, v, **kw):
    """Weights from the dense reference: attention of V = one-hot keys."""
    lk = k.shape[-2]
    eye = np.broadcast_to(np.eye(lk), (*k.shape[:-1], lk))
    return dense_attention(q, k, eye, **kw)[0]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True, "window": (9, 2)},
        {"mask": "bool"},
        {"kv_lengths": np.array([40, 0])},
        {"softcap": 3.0},
        {"alibi_slopes": np.ones(4) * 0.1},
    ],
    ids=str,
)
def test_weights_match_reference(attention, rng, kw):
    q, k, v = random_qkv(rng, (2,), 4, 2, 30, 40, 8)
    kw = dict(kw)
    if kw.get("mask") == "bool":
        kw["mask"] = rng.random((30, 40)) > 0.3
    out, lse, w = attention(q, k, v, return_lse=True, return_weights=True, **kw)
    assert w.shape == (2, 4, 30, 40)
    expected = reference_weights(q, k, v, **kw)
    np.testing.assert_allclose(w, expected, atol=2e-6)
    rows = w.sum(-1)
    assert np.allclose(rows[np.isfinite(lse)], 1, atol=1e-5)
    assert np.all(rows[~np.isfinite(lse)] == 0)
    o2, w2 = attention(q, k, v, return_weights=True, **kw)
    assert np.array_equal(o2, out)
    assert np.array_equal(w2, w)


def test_weights_2d_and_heatmap(attention, rng):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from cpuattn.plot import attention_heatmap

    q, k, v = random_qkv(rng, (), 1, 1, 5, 7, 4)
    _out, w = attention(q[0], k[0], v[0], return_weights=True, causal=True)
    assert w.shape == (5, 7)
    ax = attention_heatmap(w, query_labels=list("abcde"), key_labels=list("ABCDEFG"))
    assert ax.get_xlabel() == "key"
    with pytest.raises(ValueError, match="query_labels: expected 5 labels"):
        attention_heatmap(w, query_labels=["x"])
    matplotlib.pyplot.close("all")


def test_heatmap_head_out_of_range_is_a_value_error(rng):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from cpuattn.plot import attention_heatmap

    w = rng.random((4, 5, 7))
    with pytest.raises(ValueError, match=r"head: expected an index in \[-4, 4\), got 9"):
        attention_heatmap(w, head=9)
    with pytest.raises(TypeError, match=r"head: expected an int or None, got float"):
        attention_heatmap(w, head=1.0)
    ax = attention_heatmap(w, head=np.int64(-1))  # NumPy ints index like Python ints
    assert np.array_equal(ax.images[0].get_array(), w[3])
    assert ax.get_title() == "head -1"
    matplotlib.pyplot.close("all")


def test_heatmap_of_long_sequences_stays_small_and_legible(rng):
    """512 x 512 weights: the figure is capped at 12 inches a side (aspect kept) and at most
    32 tokens per axis are labelled, every n-th one."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from cpuattn.plot import attention_heatmap

    tokens = [f"t{i}" for i in range(512)]
    w = rng.random((512, 256))
    ax = attention_heatmap(w, query_labels=tokens, key_labels=tokens[:256])
    width, height = ax.figure.get_size_inches()
    assert max(width, height) <= 12
    assert height > width  # 512 queries by 256 keys: taller than wide
    for axis, n in ((ax.xaxis, 256), (ax.yaxis, 512)):
        ticks = axis.get_ticklocs()
        labels = [t.get_text() for t in axis.get_ticklabels()]
        assert 8 <= len(ticks) <= 32
        step = ticks[1] - ticks[0]
        assert np.all(np.diff(ticks) == step)  # every n-th token
        assert labels == [tokens[int(t)] for t in ticks]
        assert ticks[-1] + step >= n
    # Short inputs keep one label per token and a figure sized to them.
    ax = attention_heatmap(w[:5, :7], query_labels=tokens[:5], key_labels=tokens[:7])
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens[:7]
    assert max(ax.figure.get_size_inches()) < 12
    matplotlib.pyplot.close("all")
