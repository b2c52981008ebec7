"""The score epilogue (softcap, ALiBi, mask, key bounds, online softmax) behind every step
that produces scores, on every ISA: the float step on packed K^T and on K rows in place
(decode), the same on a float16 / bfloat16 cache read in place, and the bfloat16 pair steps
(vdpbf16ps, AMX tiles), packed and in place. Every modifier at once, large logits so the cap
matters, against the float64 reference on the same rounded inputs."""

import numpy as np
import pytest
from reference import assert_matches, dense_attention

from cpuattn._request import BF16

SHAPES = [  # hq, hkv, lq, lk, d, dv
    (8, 2, 1, 700, 64, 64),  # decode: K/V rows read in place, widened as loaded
    (8, 2, 3, 300, 40, 24),  # decode, D and Dv off the vector widths
    (4, 2, 40, 300, 64, 48),  # packed tiles
    (4, 4, 33, 129, 40, 40),  # packed, D % 32 != 0: the bfloat16 pairs padded
    (16, 2, 1, 300, 64, 64),  # decode, 8 rows a kv head: row blocks of 4 + 4
    (12, 4, 1, 300, 40, 40),  # decode, 3 rows a kv head: one block of 3
    (14, 2, 1, 200, 64, 64),  # decode, 7 rows a kv head: 4 + 3
    (6, 2, 9, 23, 160, 32),  # 27 rows in place (6 x 4 + 3), one key tile of 23
    (6, 2, 9, 23, 32, 32),  # the same rows at D = 32: float32 K packed (27 x 5 > D)
    (4, 4, 40, 17, 40, 40),  # packed, one key tile of 17: weights over its vectors only
    (4, 4, 12, 16, 16, 16),  # packed, 12 rows, one tile of 16 keys: scores of one vector
    (2, 2, 20, 33, 32, 24),  # packed, a tile of 33 keys: scores over 2 + 1 vectors (AVX-512)
    (2, 2, 27, 32, 32, 32),  # packed, narrow: rows in blocks of 8 + 3 (AVX-512)
    (2, 2, 16, 20, 32, 16),  # the same, 16 keys and Dv of one vector
    (2, 2, 18, 32, 32, 32),  # narrow, 2 rows past the 8-blocks: 8 + 6 + 4 (AVX-512)
    (2, 2, 17, 16, 32, 16),  # narrow, 1 row past: 8 + 6 + 3 (AVX-512)
]

KINDS = [  # (q dtype, K/V dtype, out_dtype)
    (np.float32, np.float32, None),
    (np.float32, np.float16, None),
    (np.float32, BF16, None),
    (BF16, BF16, np.float32),
]


@pytest.mark.parametrize(("hq", "hkv", "lq", "lk", "d", "dv"), SHAPES, ids=str)
@pytest.mark.parametrize(
    ("q_dtype", "kv_dtype", "out_dtype"), KINDS, ids=["f32", "f32q-f16kv", "f32q-bf16kv", "bf16"]
)
def test_every_modifier_on_every_step(
    native, rng, hq, hkv, lq, lk, d, dv, q_dtype, kv_dtype, out_dtype
):
    batch = 2
    q = (4 * rng.standard_normal((batch, hq, lq, d))).astype(q_dtype)  # logits beyond the cap
    k = rng.standard_normal((batch, hkv, lk, d)).astype(kv_dtype)
    v = rng.standard_normal((batch, hkv, lk, dv)).astype(kv_dtype)
    mask = np.where(rng.random((lq, lk)) > 0.1, rng.standard_normal((lq, lk)), -np.inf)
    kw = {
        "softcap": 5.0,
        "alibi_slopes": 2.0 ** -np.arange(1, hq + 1),
        "mask": mask.astype(np.float32),
        "kv_lengths": np.array([lk, lk * 2 // 3]),
        "causal": True,
    }
    out, lse = native(q, k, v, return_lse=True, out_dtype=out_dtype, **kw)
    ref_out, ref_lse = dense_attention(q, k, v, **kw)
    assert_matches(out, ref_out, np.float32)
    assert_matches(lse, ref_lse, np.float32, "lse")


@pytest.mark.parametrize(("lq", "first"), [(27, 7), (16, 9), (18, 10), (26, 17)], ids=str)
def test_row_blocks_give_each_row_the_same_bits(native, rng, lq, first):
    """A row's result does not depend on the row block it runs in: the first rows of a head
    whose rows go in blocks of 8 (narrow tiles, AVX-512) or 6 and 4 give the bits they give
    in a head of fewer rows (blocks of 4 + 3, or 6 + 3), all on packed K^T (rows x 5 > D)."""
    q = rng.standard_normal((2, 4, lq, 32)).astype(np.float32)
    k = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    v = rng.standard_normal((2, 4, 32, 32)).astype(np.float32)
    out, lse = native(q, k, v, return_lse=True)
    head, head_lse = native(np.ascontiguousarray(q[:, :, :first]), k, v, return_lse=True)
    np.testing.assert_array_equal(out[:, :, :first], head)
    np.testing.assert_array_equal(lse[:, :, :first], head_lse)
