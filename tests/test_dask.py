"""cpuattn.dask on a real dask.distributed cluster (2 worker processes): every chunking gives
the local call's result (float32 rounding), and bad chunks fail when the graph is built."""

import itertools

import numpy as np
import pytest
from reference import assert_matches, dense_attention, random_qkv

import cpuattn
from cpuattn._request import BF16

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
cdask = pytest.importorskip("cpuattn.dask")

F32 = np.float32


@pytest.fixture(scope="module")
def client():
    """One cluster for the module: two worker processes of one thread each."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def chunked(chunks, *arrays):
    return [da.from_array(x, chunks=chunks) for x in arrays]


def run(client, q, k, v, chunks_q, chunks_kv=None, split_every=8, **kw):
    """cpuattn.dask.attention on chunked inputs, computed on the cluster; also the local call
    for comparison."""
    (dq,) = chunked(chunks_q, q)
    dk, dv = chunked(chunks_kv or chunks_q, k, v)
    lazy = cdask.attention(dq, dk, dv, return_lse=True, split_every=split_every, **kw)
    out, lse = client.compute(lazy, sync=True)
    local = cpuattn.attention(q, k, v, return_lse=True, **kw)
    return (out, lse), local


def assert_like_local(got, local, q, k, v, **kw):
    (out, lse), (local_out, local_lse) = got, local
    assert out.dtype == local_out.dtype
    assert lse.dtype == local_lse.dtype
    assert_matches(out, local_out, F32)
    assert_matches(lse, local_lse, F32, "lse")
    ref_out, ref_lse = dense_attention(q, k, v, **kw)
    assert_matches(out, ref_out, F32)
    assert_matches(lse, ref_lse, F32, "lse")


@pytest.mark.parametrize("backend", ["numpy", "native"])
def test_batch_and_head_chunks(client, rng, backend):
    if backend == "native" and not cpuattn.info()["native"]:
        pytest.skip("no native backend")
    q, k, v = random_qkv(rng, (4,), 4, 4, 33, 40, 16)
    got, local = run(client, q, k, v, (1, 2, 33, 16), causal=True, backend=backend)
    assert_like_local(got, local, q, k, v, causal=True)


@pytest.mark.parametrize("split_every", [2, 3, 8])
def test_key_chunks_merge_in_a_tree(client, rng, split_every):
    q, k, v = random_qkv(rng, (2,), 2, 2, 20, 230, 16)
    got, local = run(client, q, k, v, (2, 2, 20, 16), (2, 2, 40, 16), split_every=split_every)
    assert_like_local(got, local, q, k, v)


@pytest.mark.parametrize(
    "options",
    [
        {"causal": True},
        {"causal": "top_left"},
        {"causal": True, "window": (25, 0)},
        {"window": (10, 30)},
        {"causal": True, "alibi_slopes": np.array([0.3, 0.1])},
        {"softcap": 2.0, "scale": 0.7},
        {"diagonal": 17, "causal": True},
    ],
    ids=["causal", "top_left", "sliding", "window", "alibi", "softcap", "diagonal"],
)
@pytest.mark.parametrize(("lq", "lk"), [(120, 120), (70, 130), (130, 70)])
def test_query_and_key_chunks(client, rng, options, lq, lk):
    q, k, v = random_qkv(rng, (1,), 2, 2, lq, lk, 16)
    got, local = run(client, q, k, v, (1, 2, 32, 16), (1, 2, 45, 16), **options)
    assert_like_local(got, local, q, k, v, **options)


def test_rows_with_no_key_stay_empty(client, rng):
    """Lq > Lk bottom-right: the first rows keep nothing, -inf lse through the merges; a query
    block whose every key block is outside the band is an empty block."""
    q, k, v = random_qkv(rng, (), 2, 2, 90, 30, 8)
    got, local = run(client, q, k, v, (2, 20, 8), (2, 10, 8), causal=True)
    assert_like_local(got, local, q, k, v, causal=True)
    assert np.all(got[1][:, :60] == -np.inf)
    assert np.all(got[0][:, :60] == 0)


@pytest.mark.parametrize("causal", [False, True, "top_left"], ids=str)
def test_kv_lengths(client, rng, causal):
    """Per-sequence lengths: bottom-right, each sequence has its own diagonal."""
    q, k, v = random_qkv(rng, (4,), 2, 1, 24, 100, 8)
    lengths = np.array([100, 37, 0, 64])
    kw = {"kv_lengths": lengths, "causal": causal, "window": (30, 0)}
    got, local = run(client, q, k, v, (2, 2, 8, 8), (2, 1, 32, 8), **kw)
    assert_like_local(got, local, q, k, v, **kw)


def test_masks_chunked_alongside(client, rng):
    q, k, v = random_qkv(rng, (2,), 2, 2, 40, 60, 8)
    bool_mask = rng.random((2, 1, 40, 60)) > 0.4
    bool_mask[:, :, 5] = False  # an all-masked row
    got, local = run(client, q, k, v, (1, 1, 16, 8), (1, 1, 25, 8), mask=bool_mask, causal=True)
    assert_like_local(got, local, q, k, v, mask=bool_mask, causal=True)

    float_mask = np.where(rng.random((40, 60)) > 0.3, rng.standard_normal((40, 60)), -np.inf)
    (dmask,) = chunked((7, 13), float_mask)  # its own chunks: rechunked to q's and k's
    (dq,) = chunked((1, 1, 16, 8), q)
    dk, dv = chunked((1, 1, 25, 8), k, v)
    out = client.compute(cdask.attention(dq, dk, dv, mask=dmask), sync=True)
    assert_matches(out, dense_attention(q, k, v, mask=float_mask)[0], F32)


def test_gqa_head_chunks(client, rng):
    """Hq = 8 over Hkv = 2: q in head chunks of 4 (one group each); k and v in one chunk,
    rechunked to follow."""
    q, k, v = random_qkv(rng, (2,), 8, 2, 30, 50, 16)
    (dq,) = chunked((1, 4, 15, 16), q)
    dk, dv = chunked((2, 2, 25, 16), k, v)
    out, lse = client.compute(cdask.attention(dq, dk, dv, causal=True, return_lse=True), sync=True)
    ref_out, ref_lse = dense_attention(q, k, v, causal=True)
    assert_matches(out, ref_out, F32)
    assert_matches(lse, ref_lse, F32, "lse")


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=str)
def test_half_precision(client, rng, dtype):
    q, k, v = (x.astype(dtype) for x in random_qkv(rng, (1,), 2, 2, 64, 96, 16))
    (dq,) = chunked((1, 2, 32, 16), q)
    dk, dv = chunked((1, 2, 32, 16), k, v)
    out, lse = client.compute(cdask.attention(dq, dk, dv, causal=True, return_lse=True), sync=True)
    local_out, local_lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == dtype
    assert lse.dtype == np.float32
    # Merged in float32 and rounded once: within one rounding of the local result.
    ulp = {np.dtype(np.float16): 2**-10, BF16: 2**-7}[dtype]
    diff = np.abs(out.astype(np.float64) - local_out.astype(np.float64))
    assert diff.max() <= ulp * np.abs(local_out.astype(np.float64)).max()
    assert_matches(lse, local_lse, F32, "lse")
    out32 = client.compute(cdask.attention(dq, dk, dv, causal=True, out_dtype=F32), sync=True)
    assert_matches(out32, dense_attention(q, k, v, causal=True)[0], F32)


def test_numpy_and_two_dim_inputs(client, rng):
    q, k, v = random_qkv(rng, (), 1, 1, 30, 40, 8)
    q, k, v = q[0], k[0], v[0]
    out = client.compute(cdask.attention(q, k, v, causal=True), sync=True)
    assert out.shape == (30, 8)
    assert_matches(out, dense_attention(q, k, v, causal=True)[0], F32)


def test_causal_pairs_outside_the_band_create_no_task(rng):
    q, k, v = random_qkv(rng, (), 1, 1, 64, 64, 8)
    dq, dk, dv = chunked((1, 16, 8), q, k, v)

    def pair_tasks(lazy):
        return sum(key_name(key) == "attend_pair" for key in dict(lazy.__dask_graph__()))

    assert pair_tasks(cdask.attention(dq, dk, dv)) == 16
    assert pair_tasks(cdask.attention(dq, dk, dv, causal=True)) == 10
    assert pair_tasks(cdask.attention(dq, dk, dv, causal=True, window=(15, 0))) == 7
    # Keys past every length are never visited.
    assert pair_tasks(cdask.attention(dq[None], dk[None], dv[None], kv_lengths=[20])) == 8


def key_name(key) -> str:
    from dask.utils import key_split

    return key_split(key)


def test_worker_threads_come_from_the_worker(client):
    from cpuattn._dask_tasks import worker_threads

    assert client.submit(worker_threads, pure=False).result() == 1
    assert worker_threads() is None  # not on a worker


def qkv_chunked(rng, chunks_q=(1, 2, 16, 8), chunks_kv=(1, 2, 16, 8)):
    q, k, v = random_qkv(rng, (1,), 2, 2, 32, 32, 8)
    (dq,) = chunked(chunks_q, q)
    dk, dv = chunked(chunks_kv, k, v)
    return dq, dk, dv


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda dq, dk, dv: (dq.rechunk({3: 4}), dk, dv),
            r"q: chunks \(4, 4\) split the head dim D",
        ),
        (lambda dq, dk, dv: (dq, dk.rechunk({3: 4}), dv), "k: chunks .* split the head dim D"),
        (lambda dq, dk, dv: (dq, dk, dv.rechunk({3: 4})), "v: chunks .* split the head dim Dv"),
        (lambda dq, dk, dv: (dq, dk, dv.rechunk({2: 8})), "v: chunks .* differ from k's"),
        (lambda dq, dk, dv: (dq, dk[:, :1], dv[:, :1]), r"q: head chunks \(1, 1\) split GQA"),
        (lambda dq, dk, dv: (dq[:, :, dq[0, 0, :, 0] > -99], dk, dv), "q: .*NaN"),
    ],
    ids=["D", "k_D", "Dv", "k_v", "gqa", "nan"],
)
def test_bad_chunks_fail_when_the_graph_is_built(rng, make, match):
    dq, dk, dv = make(*qkv_chunked(rng))
    if "GQA" in match:  # 2 query heads per kv head, q's heads in chunks of 1
        dq = dq.rechunk({1: 1})
    with pytest.raises(ValueError, match=match):
        cdask.attention(dq, dk, dv)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"split_every": 1}, ValueError, "split_every: expected an int >= 2"),
        ({"split_every": 2.0}, TypeError, "split_every: expected an int"),
        ({"window": (-2, 0)}, ValueError, r"window\[0\]"),
        ({"diagonal": 0.5}, TypeError, "diagonal: expected an int"),
        ({"diagonal": 2**61}, ValueError, r"diagonal: expected \|diagonal\| \+ Lq \+ Lk"),
        ({"kv_lengths": [40]}, ValueError, r"kv_lengths: values must lie in \[0, Lk\]"),
        ({"mask": np.zeros((32, 31), bool)}, ValueError, "mask: shape"),
        ({"mask": np.zeros((32, 32), np.int8)}, TypeError, "mask: expected bool"),
        ({"backend": "gpu"}, ValueError, "backend: expected one of"),
    ],
    ids=[
        "split_every",
        "split_every_float",
        "window",
        "diagonal",
        "diagonal_too_far_for_blocks",
        "lengths",
        "mask",
        "mask_int",
        "backend",
    ],
)
def test_bad_options_fail_when_the_graph_is_built(rng, kw, error, match):
    with pytest.raises(error, match=match):
        cdask.attention(*qkv_chunked(rng), **kw)


def test_bad_shapes_and_dtypes(rng):
    dq, dk, dv = qkv_chunked(rng)
    with pytest.raises(ValueError, match="k: expected"):
        cdask.attention(dq, dk[..., :4], dv)
    with pytest.raises(TypeError, match="q: expected a float32"):
        cdask.attention(dq.astype(np.int32), dk, dv)


def test_pairs_inside_the_band_run_without_bounds():
    """Causal, 4 x 4 blocks of 16: below the diagonal every row keeps every key (no bounds),
    on it some, above it none."""
    from cpuattn._request import build_request
    from cpuattn.dask import _band

    x = np.broadcast_to(np.zeros((), F32), (1, 64, 8))
    req = build_request(x, x, x, causal=True)
    n_keys = np.array(64)
    for qi in range(4):
        for ki in range(4):
            a, c = 16 * qi, 16 * ki
            needed, inside = _band(req, n_keys, a, a + 16, c, c + 16)
            assert (needed, inside) == (ki <= qi, ki < qi)


def random_chunks(rng, n: int, unit: int = 1) -> tuple[int, ...]:
    """Random chunk sizes, multiples of unit, summing to n."""
    cuts = sorted(set(rng.integers(1, max(n // unit, 2), size=rng.integers(0, 3)).tolist()))
    edges = [0, *(unit * c for c in cuts if unit * c < n), n]
    return tuple(b - a for a, b in itertools.pairwise(edges))


@pytest.mark.parametrize("seed", range(6))
def test_random_chunkings_and_options(client, seed):
    """Random chunks on every axis (k and v with batch chunks of their own, rechunked to
    follow q's) and random options together, against the reference."""
    rng = np.random.default_rng(seed)
    hkv, group = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    lq, lk, dv = int(rng.integers(1, 90)), int(rng.integers(2, 90)), int(rng.integers(1, 12))
    q, k, v = random_qkv(rng, (2, 2), hkv * group, hkv, lq, lk, 8, dv=dv)
    options = {
        "causal": [False, True, "top_left"][seed % 3],
        "window": [None, (int(rng.integers(0, 20)), int(rng.integers(-1, 5)))][seed % 2],
        "kv_lengths": rng.integers(0, lk + 1, size=(2, 2)) if seed % 3 else None,
        "alibi_slopes": rng.random(hkv * group) if seed % 4 == 1 else None,
        "diagonal": int(rng.integers(-10, 10)) if seed == 5 else None,
        "mask": rng.random((2, 1, lq, lk)) > 0.2 if seed % 2 else None,
    }
    heads = random_chunks(rng, hkv * group, group)
    dq = da.from_array(q, chunks=(random_chunks(rng, 2), (1, 1), heads, random_chunks(rng, lq), 8))
    kv_chunks = ((2,), random_chunks(rng, 2), (hkv,), random_chunks(rng, lk))
    dk = da.from_array(k, chunks=(*kv_chunks, 8))
    dvv = da.from_array(v, chunks=(*kv_chunks, dv))
    lazy = cdask.attention(dq, dk, dvv, return_lse=True, split_every=2, **options)
    out, lse = client.compute(lazy, sync=True)
    ref_out, ref_lse = dense_attention(q, k, v, **options)
    assert_matches(out, ref_out, F32)
    assert_matches(lse, ref_lse, F32, "lse")


@pytest.mark.parametrize(
    ("chunks_q", "chunks_kv"), [((1, 2, 32, 16), (1, 2, 45, 16)), ((1, 2, 20, 16), (1, 2, 200, 16))]
)
def test_sinks_join_each_query_block_once(client, rng, chunks_q, chunks_kv):
    """Sink logits merge once per row whatever the key blocks: the local call's results,
    rows with no key included (out 0, lse = the sink)."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 90, 60, 16)
    sinks = np.array([0.5, -1.0])
    got, local = run(client, q, k, v, chunks_q, chunks_kv, causal=True, sinks=sinks)
    (out, lse), (local_out, local_lse) = got, local
    assert_matches(out, local_out, F32)
    assert_matches(lse, local_lse, F32, "lse")
    assert np.all(out[:, :, :30] == 0)  # bottom-right, Lq > Lk: the first 30 rows keep nothing
    np.testing.assert_allclose(lse[0, :, :30], np.broadcast_to(sinks[:, None], (2, 30)))


@pytest.mark.parametrize(
    ("chunks_q", "chunks_kv", "kw"),
    [
        ((1, 2, 32, 16), (1, 2, 45, 16), {"causal": True, "window": (10, 0), "global_tokens": 4}),
        (
            (1, 2, 25, 16),
            (1, 2, 64, 16),
            {"causal": "top_left", "window": (5, 5), "global_tokens": [0, 50, 70, 199]},
        ),
        (
            (1, 2, 40, 16),
            (1, 2, 50, 16),
            {"window": (3, 3), "global_tokens": [7, 130], "kv_lengths": [150]},
        ),
    ],
)
def test_global_tokens(client, rng, chunks_q, chunks_kv, kw):
    """Hybrid attention over blocks: each pair outside the band runs only where a global key
    or query reaches it, with the positions shifted to its keys: the local call's results."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 120, 200, 16)
    kw = {**kw, "kv_lengths": np.array(kw["kv_lengths"])} if "kv_lengths" in kw else kw
    got, local = run(client, q, k, v, chunks_q, chunks_kv, **kw)
    assert_like_local(got, local, q, k, v, **kw)


def test_global_tokens_add_only_the_pairs_they_reach(rng):
    q, k, v = random_qkv(rng, (), 1, 1, 64, 64, 8)
    dq, dk, dv = chunked((1, 16, 8), q, k, v)

    def pair_tasks(lazy):
        return sum(key_name(key) == "attend_pair" for key in dict(lazy.__dask_graph__()))

    window = {"causal": True, "window": (15, 0)}
    assert pair_tasks(cdask.attention(dq, dk, dv, **window)) == 7
    # Key 0 is global: the first key block joins every query block's pairs (7 + 2 more).
    assert pair_tasks(cdask.attention(dq, dk, dv, global_tokens=1, **window)) == 9
    # Query 60 is global too: its block (48-63) sees every key block up to it (one more).
    assert pair_tasks(cdask.attention(dq, dk, dv, global_tokens=[0, 60], **window)) == 10


def test_global_positions_blocks_cannot_take_fail_when_the_graph_is_built(rng):
    q, k, v = random_qkv(rng, (1,), 2, 2, 32, 64, 8)
    dq, dk, dv = chunked((1, 2, 16, 8), q, k, v)
    with pytest.raises(ValueError, match="global_tokens"):
        cdask.attention(dq, dk, dv, window=(2, 0), diagonal=0, global_tokens=[-(2**61)])


def test_nan_in_a_key_chunk_makes_the_rows_that_keep_it_nan(client, rng):
    """As the local call: a NaN in K of a kept key makes its rows NaN (out and lse) and no
    other row, across key chunks too."""
    q, k, v = random_qkv(rng, (1,), 2, 2, 12, 40, 8)
    k[0, 1, 25, 3] = np.nan  # head 1, key 25: the rows that keep it are causal rows >= 25 - 28
    (out, lse), (local_out, local_lse) = run(
        client, q, k, v, (1, 2, 12, 8), (1, 2, 10, 8), causal=True
    )
    np.testing.assert_array_equal(np.isnan(out), np.isnan(local_out))
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(local_lse))
    assert np.isnan(lse[0, 1]).any()
    assert not np.isnan(lse[0, 0]).any()
