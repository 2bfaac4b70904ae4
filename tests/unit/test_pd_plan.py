"""Pure P/D planning: which ranks take part, regions, descriptor tables and index lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvconnect.errors import CompatibilityError, LayoutError
from kvconnect.layout import FLASH_NHD_DIMS, VLLM_CPU_DIMS, KVLayout, head_sources
from kvconnect.metadata import LayerRegion
from kvconnect.pd import plan as P

COMBOS = [
    (h, p, c, mla)
    for h in (1, 2, 4, 8)
    for p in (1, 2, 4, 8)
    for c in (1, 2, 4, 8)
    for mla in (False, True)
    if mla or (h % p == 0 or p % h == 0) and (h % c == 0 or c % h == 0)
]


@pytest.mark.parametrize("heads,p_tp,c_tp,mla", COMBOS)
def test_every_producer_rank_is_told_by_exactly_the_ranks_it_waits_for(heads, p_tp, c_tp, mla):
    told = {p: set() for p in range(p_tp)}
    for c in range(c_tp):
        for p in P.producers_to_notify(heads, c_tp, c, p_tp, mla):
            told[p].add(c)
    for p in range(p_tp):
        assert told[p] == set(P.expected_consumers(heads, p_tp, p, c_tp, mla)) != set()


@pytest.mark.parametrize("heads,p_tp,c_tp,mla", COMBOS)
def test_sources_are_told_so_a_read_frees_its_producer(heads, p_tp, c_tp, mla):
    for c in range(c_tp):
        assert set(P.source_ranks(heads, c_tp, c, p_tp, mla)) <= set(
            P.producers_to_notify(heads, c_tp, c, p_tp, mla)
        )


def test_push_and_pull_pair_the_same_heads():
    for c in range(4):
        for p in range(2):
            pull = P.consumer_head_pairs(4, 4, c, 2, p, False)
            push = P.producer_head_pairs(4, 2, p, 4, c, False)
            assert pull == tuple((peer, mine, n) for mine, peer, n in push)
    assert head_sources(4, 4, 0, 2)[0].remote_rank == 0


def _region(name, t, dims, group=0):
    lay = KVLayout.of_tensor(t, dims, group)
    return LayerRegion(name=name, base_addr=t.data_ptr(), dims=lay.dims, shape=lay.shape, strides=lay.strides,
                       itemsize=lay.itemsize, dtype=lay.dtype, group=group)


def test_layers_viewing_one_buffer_share_one_region():
    buf = torch.zeros(2, 4, 2, 16, 8)
    regions, placed = P.place_layers(
        [_region("a", buf[0], VLLM_CPU_DIMS), _region("b", buf[1], VLLM_CPU_DIMS)]
    )
    assert regions == [(buf.data_ptr(), buf.numel() * 4)]
    assert [p.offset for p in placed] == [0, buf[1].data_ptr() - buf.data_ptr()]


def test_separate_tensors_get_separate_regions():
    a, b = torch.zeros(4, 2, 16, 8), torch.zeros(4, 2, 16, 8)
    regions, placed = P.place_layers([_region("a", a, VLLM_CPU_DIMS), _region("b", b, VLLM_CPU_DIMS)])
    assert len(regions) == 2 and {p.region for p in placed} == {0, 1}


def _placed(kind_dims, shape, n=2):
    ts = [torch.zeros(*shape) for _ in range(n)]
    return P.place_layers([_region(f"l{i}", t, kind_dims) for i, t in enumerate(ts)])[1]


def test_whole_blocks_of_a_homogeneous_peer_are_one_piece_per_kv_plane():
    local = _placed(FLASH_NHD_DIMS, (2, 8, 16, 2, 8))
    plan = P.build_plan(local, local, (16,), (16,), ((0, 0, 2),), "peer")
    assert len(plan.local_descs) == 2 * 8 * 2  # layers x blocks x (K, V)
    li, ri = plan.indices([[3, 4]], [[5, 6]], 0, 32)
    assert li.size == ri.size == 2 * 2 * 2
    assert (plan.local_descs[li, 2] == 16 * 2 * 8 * 4).all()


def test_incompatible_layers_are_refused_naming_the_layer():
    a = _placed(VLLM_CPU_DIMS, (8, 2, 16, 16))
    b = _placed(VLLM_CPU_DIMS, (8, 2, 16, 32))
    with pytest.raises(CompatibilityError, match="l0"):
        P.build_plan(a, b, (16,), (16,), ((0, 0, 2),), "peer")


def test_too_few_block_ids_for_the_tokens_is_a_layout_error():
    local = _placed(VLLM_CPU_DIMS, (8, 2, 16, 16))
    plan = P.build_plan(local, local, (16,), (16,), ((0, 0, 2),), "peer")
    with pytest.raises(LayoutError, match="remote block ids cover 16 tokens"):
        plan.indices([[1, 2]], [[1]], 0, 20)
    with pytest.raises(LayoutError, match="outside the KV cache"):
        plan.indices([[1, 99]], [[1, 2]], 0, 20)


def test_indices_follow_the_token_units_across_block_sizes():
    lo = _placed(VLLM_CPU_DIMS, (8, 1, 16, 4), n=1)
    hi = _placed(VLLM_CPU_DIMS, (8, 1, 32, 4), n=1)
    plan = P.build_plan(lo, hi, (16,), (32,), ((0, 0, 1),), "peer")
    li, ri = plan.indices([[5, 6, 7]], [[2, 3]], 0, 40)
    # 16-token units: local blocks 5, 6, 7 take remote block 2 (first, second half), then 3
    assert li.tolist() == [5, 6, 7]
    assert ri.tolist() == [4, 5, 6]
    assert np.array_equal(plan.local_descs[li, 2], plan.remote_descs[ri, 2])
