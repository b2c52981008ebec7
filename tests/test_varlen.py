"""attention_varlen: packed sequences equal attention on each sequence alone."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention

import cpuattn

F32 = np.float32


def packed(rng, lengths_q, lengths_k, hq=4, hkv=2, d=16, dv=12):
    q = rng.standard_normal((sum(lengths_q), hq, d)).astype(F32)
    k = rng.standard_normal((sum(lengths_k), hkv, d)).astype(F32)
    v = rng.standard_normal((sum(lengths_k), hkv, dv)).astype(F32)
    return q, k, v, np.cumsum([0, *lengths_q]), np.cumsum([0, *lengths_k])


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"causal": "top_left"},
                                {"window": (7, 0), "causal": True}, {"softcap": 3.0},
                                {"alibi_slopes": "per-sequence"}], ids=str)
def test_each_sequence_as_if_alone(attention, rng, kw):
    backend = attention.keywords["backend"]
    lengths_q, lengths_k = [5, 0, 33, 1, 70], [9, 4, 33, 120, 64]
    q, k, v, cu_q, cu_k = packed(rng, lengths_q, lengths_k)
    kw = dict(kw)
    if kw.get("alibi_slopes") == "per-sequence":
        kw["alibi_slopes"] = rng.random((5, 4))
    out, lse = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, backend=backend,
                                        **kw)
    assert out.shape == (q.shape[0], 4, 12)
    assert lse.shape == (4, q.shape[0])
    for b in range(5):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        one = {**kw, "alibi_slopes": kw["alibi_slopes"][b]} if "alibi_slopes" in kw else kw
        ref_out, ref_lse = dense_attention(q[qs].swapaxes(0, 1), k[ks].swapaxes(0, 1),
                                           v[ks].swapaxes(0, 1), **one)
        assert_matches(out[qs].swapaxes(0, 1), ref_out, F32)
        assert_matches(lse[:, qs], ref_lse, F32, "lse")


@pytest.mark.parametrize(("cu_q", "cu_k", "exc", "match"), [
    ([0, 3, 5], [0, 9], ValueError, r"cu_seqlens_k: expected 3 entries"),
    ([1, 5], [0, 9], ValueError, r"cu_seqlens_q: expected offsets starting at 0 and ending at 5"),
    ([0, 5], [0, 8], ValueError, r"cu_seqlens_k: expected offsets starting at 0 and ending at 9"),
    ([0, 4, 2, 5], [0, 3, 6, 9], ValueError, "cu_seqlens_q: offsets must be non-decreasing"),
    ([0.0, 5.0], [0, 9], TypeError, "cu_seqlens_q: expected a 1-D integer array"),
])
def test_bad_offsets(rng, cu_q, cu_k, exc, match):
    q, k, v, _, _ = packed(rng, [5], [9])
    with pytest.raises(exc, match=match):
        cpuattn.attention_varlen(q, k, v, np.array(cu_q), np.array(cu_k))


def test_bad_shapes(rng):
    q, k, v, cu_q, cu_k = packed(rng, [5], [9])
    with pytest.raises(ValueError, match=r"q: expected \(total, H, D\) for varlen"):
        cpuattn.attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected shape \(Hq,\)"):
        cpuattn.attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="must divide"):
        cpuattn.attention_varlen(q[:, :3], k, v, cu_q, cu_k)
