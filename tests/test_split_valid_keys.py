"""Split-KV (decode) cuts the valid keys, up to the largest kv_lengths entry, not the padding
of a cache allocated longer than every sequence in it: such a cache gives the same bits as the
same cache cut to its longest sequence, for any thread count."""

import ml_dtypes
import numpy as np
import pytest
from reference import assert_matches, dense_attention

LENGTHS = np.array([8000, 3000, 7000, 100])


def decode_inputs(rng, dtype, lk=16384):
    # 4 x 8 = 32 work items: few enough for split-KV, and enough that the chunk count is
    # capped (256 tasks in all), so chunks cut from Lk would be twice as long as those cut
    # from the valid keys, and merged in another order.
    q = rng.standard_normal((4, 16, 1, 64)).astype(dtype)
    k = rng.standard_normal((4, 8, lk, 64)).astype(dtype)
    v = rng.standard_normal((4, 8, lk, 64)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_cache_padding_changes_no_bit(native, rng, dtype):
    q, k, v = decode_inputs(rng, dtype)
    cut = int(LENGTHS.max())
    kw = {"kv_lengths": LENGTHS, "return_lse": True}
    expected = native(q, k[:, :, :cut], v[:, :, :cut], num_threads=1, **kw)
    for threads in (1, 2, 3):
        got = native(q, k, v, num_threads=threads, **kw)
        for a, b in zip(got, expected, strict=True):
            assert np.array_equal(a, b)


def test_padded_cache_matches_reference(native, rng):
    q, k, v = decode_inputs(rng, np.float32)
    out, lse = native(q, k, v, kv_lengths=LENGTHS, return_lse=True)
    ref_out, ref_lse = dense_attention(q, k, v, kv_lengths=LENGTHS)
    assert_matches(out, ref_out, np.float32)
    assert_matches(lse, ref_lse, np.float32, what="lse")
