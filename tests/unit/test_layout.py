import numpy as np
import pytest
import torch

from kvconnect.errors import LayoutError
from kvconnect.layout import (
    FLASH_HND_DIMS,
    FLASH_NHD_DIMS,
    MLA_DIMS,
    VLLM_CPU_DIMS,
    KVLayout,
    head_sources,
    head_targets,
    merge_paired_runs,
    merge_segments,
    pair_rows,
    rank_heads,
)

pytestmark = pytest.mark.unit


def _filled(shape):
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)


def _gather(tensor: torch.Tensor, ranges) -> bytes:
    raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    return b"".join(raw[o : o + n] for o, n in ranges)


# -- byte ranges ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,dims,index",
    [
        ((6, 2, 32, 8), VLLM_CPU_DIMS, lambda t, b: t[b]),
        ((2, 6, 16, 4, 8), FLASH_NHD_DIMS, lambda t, b: t[:, b]),
        ((2, 6, 4, 16, 8), FLASH_HND_DIMS, lambda t, b: t[:, b]),
        ((6, 16, 12), MLA_DIMS, lambda t, b: t[b]),
    ],
)
def test_block_ranges_cover_exactly_the_block_bytes(shape, dims, index):
    t = _filled(shape)
    layout = KVLayout.of_tensor(t, dims)
    got = _gather(t, layout.block_ranges(4))
    assert sorted(np.frombuffer(got, np.float32)) == sorted(index(t, 4).reshape(-1).tolist())
    assert sum(n for _, n in layout.block_ranges(4)) == layout.block_bytes


def test_block_ranges_merge_contiguous_rows_into_one_range():
    t = _filled((6, 2, 32, 8))
    layout = KVLayout.of_tensor(t, VLLM_CPU_DIMS)
    assert layout.block_ranges(2) == [(2 * 2 * 32 * 8 * 4, 2 * 32 * 8 * 4)]
    nhd = KVLayout.of_tensor(_filled((2, 6, 16, 4, 8)), FLASH_NHD_DIMS)
    assert len(nhd.block_ranges(1)) == 2  # one per K/V plane


def test_token_and_head_subranges_select_the_right_elements():
    t = _filled((6, 4, 32, 8))
    layout = KVLayout.of_tensor(t, VLLM_CPU_DIMS)
    got = np.frombuffer(_gather(t, layout.block_ranges(1, tokens=(8, 24), heads=(1, 3))), np.float32)
    assert got.tolist() == t[1, 1:3, 8:24].reshape(-1).tolist()


def test_layout_of_a_padded_view_uses_strides():
    base = _filled((6, 2, 32, 16))
    view = base[..., :8]  # feature padded to 16
    layout = KVLayout.of_tensor(view, VLLM_CPU_DIMS)
    ranges = layout.block_ranges(0, tokens=(0, 1), heads=(0, 1))
    assert ranges == [(0, 8 * 4)]
    assert layout.block_bytes == 2 * 32 * 8 * 4


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(dims=("block", "token"), shape=(2, 4), strides=(4, 1)), "feature"),
        (dict(dims=("block", "toke", "feature"), shape=(2, 4, 8), strides=(32, 8, 1)), "unknown dimension"),
        (dict(dims=("block", "token", "feature"), shape=(2, 4), strides=(8, 1)), "do not match"),
        (
            dict(dims=("kv", "block", "token", "feature"), shape=(3, 2, 4, 8), strides=(64, 32, 8, 1)),
            "size 2",
        ),
        (dict(dims=("block", "token", "feature"), shape=(2, 4, 8), strides=(32, 2, 4)), "contiguous"),
        (dict(dims=("block", "block", "feature"), shape=(2, 4, 8), strides=(32, 8, 1)), "repeat"),
    ],
)
def test_bad_layouts_are_refused_with_the_reason(kwargs, msg):
    with pytest.raises(LayoutError, match=msg):
        KVLayout(itemsize=2, **kwargs)


def test_out_of_range_block_token_or_head_is_an_error():
    layout = KVLayout.of_tensor(_filled((6, 2, 32, 8)), VLLM_CPU_DIMS)
    with pytest.raises(LayoutError, match="block id"):
        layout.block_ranges(6)
    with pytest.raises(LayoutError, match="token range"):
        layout.block_ranges(0, tokens=(0, 33))
    with pytest.raises(LayoutError, match="head range"):
        layout.block_ranges(0, heads=(1, 1))


def test_pair_rows_maps_between_different_memory_orders():
    nhd_t = _filled((2, 6, 16, 4, 8))
    hnd_t = torch.zeros(2, 6, 4, 16, 8)
    nhd = KVLayout.of_tensor(nhd_t, FLASH_NHD_DIMS)
    hnd = KVLayout.of_tensor(hnd_t, FLASH_HND_DIMS)
    src = nhd_t.view(torch.uint8).reshape(-1)
    dst = hnd_t.view(torch.uint8).reshape(-1)
    for lo, ro, n in pair_rows(hnd, nhd):  # local = hnd (destination)
        dst[hnd.stride_bytes("block") * 2 + lo : hnd.stride_bytes("block") * 2 + lo + n] = src[
            nhd.stride_bytes("block") * 3 + ro : nhd.stride_bytes("block") * 3 + ro + n
        ]
    assert torch.equal(hnd_t[:, 2].permute(0, 2, 1, 3), nhd_t[:, 3])


def test_pair_rows_refuses_regions_of_different_size():
    a = KVLayout.of_tensor(_filled((6, 2, 32, 8)), VLLM_CPU_DIMS)
    with pytest.raises(LayoutError, match="differ in size"):
        pair_rows(a, a, local_tokens=(0, 16), remote_tokens=(0, 8))
    m = KVLayout.of_tensor(_filled((6, 32, 16)), MLA_DIMS)
    with pytest.raises(LayoutError, match="cannot be paired"):
        pair_rows(a, m)


def test_merge_segments_needs_both_sides_contiguous():
    segs = np.array([[0, 100, 10], [10, 110, 10], [20, 500, 10], [30, 510, 10]])
    assert merge_segments(segs).tolist() == [[0, 100, 20], [20, 500, 20]]
    assert merge_segments(np.zeros((0, 3))).shape == (0, 3)


# -- runs --------------------------------------------------------------------------------------
def test_merge_paired_runs_breaks_when_either_side_jumps():
    assert merge_paired_runs([1, 2, 3, 7], [4, 5, 9, 10]) == [(1, 4, 2), (3, 9, 1), (7, 10, 1)]
    assert merge_paired_runs([], []) == []
    with pytest.raises(LayoutError):
        merge_paired_runs([1], [])


# -- tensor parallelism ----------------------------------------------------------------------------
def test_rank_heads_splits_and_replicates():
    assert [rank_heads(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [rank_heads(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 2)] * 4
    with pytest.raises(LayoutError):
        rank_heads(8, 3, 0)
    with pytest.raises(LayoutError):
        rank_heads(8, 4, 4)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("local_tp", [1, 2, 4, 8])
@pytest.mark.parametrize("remote_tp", [1, 2, 4, 8])
def test_head_sources_give_each_local_head_exactly_once_from_a_holder(heads, local_tp, remote_tp):
    for rank in range(local_tp):
        lo, hi = rank_heads(heads, local_tp, rank)
        got = []
        for s in head_sources(heads, local_tp, rank, remote_tp):
            r_lo, r_hi = rank_heads(heads, remote_tp, s.remote_rank)
            for i in range(s.count):
                g = r_lo + s.remote_head + i
                assert r_lo <= g < r_hi  # the remote rank really holds it
                assert g == lo + s.local_head + i  # and it lands on the same global head
                got.append(g)
        assert got == list(range(lo, hi))


def test_replicated_heads_are_read_from_spread_replicas():
    # 2 heads, producer TP 8 (4 replicas each), consumer TP 2: readers use different replicas
    a = head_sources(2, 2, 0, 8)
    b = head_sources(2, 2, 1, 8)
    assert a[0].remote_rank in range(0, 4) and b[0].remote_rank in range(4, 8)
    # consumer TP 8 reading from TP 4 with 2 heads: consumers of the same head spread over replicas
    srcs = {head_sources(2, 8, r, 4)[0].remote_rank for r in range(4)}
    assert srcs == {0, 1}


def test_mla_is_read_whole_from_one_rank():
    s = head_sources(1, 4, 3, 2, is_mla=True)
    assert len(s) == 1 and s[0].remote_rank == 1


def test_head_targets_is_the_inverse_of_head_sources():
    for producer in range(2):
        targets = head_targets(8, 2, producer, 4)
        for consumer in range(4):
            want = [s for s in head_sources(8, 4, consumer, 2) if s.remote_rank == producer]
            assert targets.get(consumer, []) == want


def test_feature_major_planes_pair_by_token_runs_across_block_sizes():
    # [block, head, feature, token] (K stored transposed, as vLLM's CPU kernel does): tokens
    # 32..64 of a 64-token block pair with a whole 32-token block, one run per feature.
    from kvconnect.layout import KVLayout, pair_rows

    big = KVLayout(
        dims=("block", "head", "feature", "token"),
        shape=(4, 2, 8, 64),
        strides=(1024, 512, 64, 1),
        itemsize=4,
    )
    small = KVLayout(
        dims=("block", "head", "feature", "token"), shape=(8, 2, 8, 32), strides=(512, 256, 32, 1), itemsize=4
    )
    assert big.feature_major and big.signature() == small.signature()
    rows = pair_rows(small, big, (0, 32), (32, 64))
    assert rows.shape == (16, 3)
    assert (rows[:, 2] == 32 * 4).all()
    assert rows[1].tolist() == [32 * 4, (64 + 32) * 4, 128]  # feature 1 of head 0
