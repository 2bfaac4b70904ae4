"""The host tier copies what is contiguous in the engine as one run: vLLM's CPU cache, registered
as the vLLM adapter registers it (``layer_entries``: a ``.k`` and a ``.v`` view of each layer's
``[blocks, heads, block_size, 2*head_dim]`` tensor), moves one run per block and layer, byte for
byte, and the pool holds the engine's block bytes in the engine's order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvconnect.adapters.vllm_translate import layer_entries
from kvconnect.api import EngineInfo
from kvconnect.backends.cpu_offload import CpuOffloadWorker
from kvconnect.backends.cpu_offload.copier import build_layers, copy_blocks
from kvconnect.backends.cpu_offload.rows import Entry, plan_spans
from kvconnect.bench.offload import FullAttentionSpec
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import LayoutError
from kvconnect.layout import FLASH_NHD_DIMS, MLA_DIMS, KVLayout
from tests.unit.test_offload_worker import load, store

pytestmark = pytest.mark.unit


@dataclass
class SlidingWindowSpec(FullAttentionSpec):
    sliding_window: int = 64


def vllm_cpu_layer(blocks: int, bs: int, heads: int = 2, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """One layer of vLLM's CPU cache with random bytes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((blocks, heads, bs, 2 * dim), generator=g).to(torch.bfloat16)


def entries_of(tensors: dict[str, torch.Tensor], spec, group: int = 0) -> dict:
    out = {}
    for name, t in tensors.items():
        for entry, view, lay in layer_entries(name, t, spec, group):
            out[entry] = (view, lay)
    return out


def worker(caches, block_size: int, **kw) -> CpuOffloadWorker:
    w = CpuOffloadWorker(
        CpuOffloadConfig(cpu_bytes_to_use=1 << 22, **kw), EngineInfo("e", block_sizes=(block_size,))
    )
    w.register_kv_caches(caches)
    return w


def block_bytes(t: torch.Tensor, b: int) -> torch.Tensor:
    return t[b].contiguous().view(torch.uint8).reshape(-1).clone()


@pytest.mark.parametrize("bs", [16, 32])
def test_vllm_cpu_k_and_v_entries_of_a_layer_merge_into_one_run_per_block(bs):
    t = vllm_cpu_layer(8, bs)
    caches = entries_of({"l0": t}, FullAttentionSpec(bs, 2, 16, 16))
    assert set(caches) == {"l0.k", "l0.v"}
    plans, left = plan_spans([Entry.of(n, v, lay) for n, (v, lay) in caches.items()])
    assert not left and len(plans) == 1
    (p,) = plans
    assert set(p.names) == {"l0.k", "l0.v"}
    assert p.rows_per_block == 1 and p.chunk == t[0].numel() * t.element_size() and p.block_step == 1


def test_padded_heads_merge_k_and_v_of_each_head_and_leave_the_padding():
    # Heads padded apart (to twice their size): each head's K|V is one run, the padding is
    # neither stored nor loaded.
    bs, dim = 16, 16
    raw = torch.randn(8, 2, 2 * bs * 2 * dim).to(torch.bfloat16)
    t = raw[:, :, : bs * 2 * dim].unflatten(2, (bs, 2 * dim))
    caches = entries_of({"l0": t}, FullAttentionSpec(bs, 2, dim, dim))
    (p,), left = plan_spans([Entry.of(n, v, lay) for n, (v, lay) in caches.items()])
    assert not left and p.rows_per_block == 2 and p.chunk == bs * 2 * dim * 2
    w = worker(caches, block_size=bs)
    pad = raw[:, :, bs * 2 * dim :].clone()
    want = [block_bytes(t, b) for b in (1, 5)]
    store(w, "a", [1, 5], [0, 1], [b"x", b"y"])
    load(w, "b", [6, 2], [0, 1], [b"x", b"y"])
    assert all(torch.equal(x, y) for x, y in zip(want, [block_bytes(t, b) for b in (6, 2)]))
    assert torch.equal(raw[:, :, bs * 2 * dim :], pad)  # padding untouched
    w.shutdown()


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("threads", [1, 2])
def test_vllm_cpu_blocks_round_trip_byte_for_byte_and_the_pool_holds_the_engine_bytes(
    bs, threads, monkeypatch
):
    from kvconnect.backends.cpu_offload import copier

    monkeypatch.setattr(copier, "SPLIT_MIN_BYTES", 1)  # two threads split even this small task
    tensors = {f"l{i}": vllm_cpu_layer(24, bs, seed=i) for i in range(3)}
    caches = entries_of(tensors, FullAttentionSpec(bs, 2, 16, 16))
    w = worker(caches, block_size=bs, copy_threads=threads)
    assert len(w.layers) == 3 and all(lc.plan is not None and lc.plan.rows_per_block == 1 for lc in w.layers)
    src, dst, slots = [3, 9, 4, 12, 20], [1, 14, 15, 0, 23], [5, 6, 2, 7, 8]
    keys = [b"k%d" % i for i in range(len(src))]
    want = {n: [block_bytes(t, b) for b in src] for n, t in tensors.items()}
    untouched = {n: [block_bytes(t, b) for b in (2, 13)] for n, t in tensors.items()}
    assert not store(w, "a", src, slots, keys).failed_sending
    for lc in w.layers:  # the slot is the engine's block, byte for byte, in the engine's order
        t = tensors[lc.names[0].rsplit(".", 1)[0]]
        for b, s in zip(src, slots):
            assert torch.equal(lc.pool[s], block_bytes(t, b))
    assert not load(w, "b", dst, slots, keys).failed_recving
    for n, t in tensors.items():
        assert all(torch.equal(x, block_bytes(t, b)) for x, b in zip(want[n], dst))
        assert all(torch.equal(x, block_bytes(t, b)) for x, b in zip(untouched[n], (2, 13)))
    w.shutdown()


def test_only_the_bytes_the_entries_cover_move_when_they_cover_part_of_a_block():
    # A partial block: only the V planes are registered. Their bytes round-trip, the K planes of
    # the destination blocks are left as they were, and the pool holds V alone.
    bs, dim = 16, 16
    t = vllm_cpu_layer(8, bs)
    caches = {"l0.v": entries_of({"l0": t}, FullAttentionSpec(bs, 2, dim, dim))["l0.v"]}
    vlay = caches["l0.v"][1]
    w = worker(caches, block_size=bs)
    (lc,) = w.layers
    assert lc.plan is not None and lc.plan.rows_per_block == 2 and lc.pool.shape[1] == vlay.block_bytes
    flat = t.view(8, 2, -1)  # per (block, head): K ([dim, bs], transposed), then V ([bs, dim])
    k_before = flat[:, :, : bs * dim].clone()
    v_want = flat[[1, 4], :, bs * dim :].clone()
    store(w, "a", [1, 4], [0, 1], [b"x", b"y"])
    load(w, "b", [6, 7], [0, 1], [b"x", b"y"])
    assert torch.equal(flat[[6, 7], :, bs * dim :], v_want)
    assert torch.equal(flat[:, :, : bs * dim], k_before)
    w.shutdown()


def test_a_load_of_part_of_a_stored_run_moves_only_those_blocks():
    bs = 32
    tensors = {"l0": vllm_cpu_layer(16, bs)}
    caches = entries_of(tensors, FullAttentionSpec(bs, 2, 16, 16))
    w = worker(caches, block_size=bs)
    t = tensors["l0"]
    want = [block_bytes(t, b) for b in (2, 3, 4, 5)]
    store(w, "a", [2, 3, 4, 5], [0, 1, 2, 3], [b"a", b"b", b"c", b"d"])
    others = [block_bytes(t, b) for b in range(16) if b not in (9, 11)]
    load(w, "b", [11, 9], [1, 3], [b"b", b"d"])  # slots 1 and 3 only, into other blocks
    assert torch.equal(block_bytes(t, 11), want[1]) and torch.equal(block_bytes(t, 9), want[3])
    assert all(
        torch.equal(x, block_bytes(t, b)) for x, b in zip(others, [b for b in range(16) if b not in (9, 11)])
    )
    w.shutdown()


def test_kv_cache_groups_sharing_memory_are_planned_apart_and_copy_their_own_block_ids():
    # vLLM's hybrid allocator shares one tensor between a layer of each KV-cache group; the groups
    # index it with their own block ids, so their entries must not merge across groups. Group 0's
    # second layer has a tensor of its own; group 1 (sliding window) shares group 0's first. The
    # groups' pieces line up by position, so group 1 shares group 0's pools (a slot holds one
    # block of one group).
    bs = 16
    shared = vllm_cpu_layer(16, bs, seed=1)
    own = vllm_cpu_layer(16, bs, seed=2)
    other = vllm_cpu_layer(16, bs, seed=3)
    g0 = entries_of({"full.0": shared, "full.1": own}, FullAttentionSpec(bs, 2, 16, 16), group=0)
    g1 = entries_of({"swa.0": other, "swa.1": shared}, SlidingWindowSpec(bs, 2, 16, 16), group=1)
    plans, left = plan_spans([Entry.of(n, v, lay) for n, (v, lay) in {**g0, **g1}.items()])
    assert not left and sorted((p.group, p.names) for p in plans) == [
        (0, ("full.0.k", "full.0.v")), (0, ("full.1.k", "full.1.v")),
        (1, ("swa.0.k", "swa.0.v")), (1, ("swa.1.k", "swa.1.v"))]
    l0 = build_layers(g0, num_slots=6)
    l1 = build_layers(g1, num_slots=6, share_pools_with=l0)
    assert [lc.pool for lc in l1] == [lc.pool for lc in l0] and all(
        lc.plan.rows_per_block == 1 for lc in l0 + l1
    )
    before = {id(t): [block_bytes(t, b) for b in range(16)] for t in (shared, own, other)}
    copy_blocks(l0, "store", [3, 4], [0, 1])
    copy_blocks(l1, "store", [10, 11], [2, 3])
    copy_blocks(l0, "load", [7, 8], [0, 1])
    copy_blocks(l1, "load", [13, 14], [2, 3])
    # group 0: full.0 -> shared, full.1 -> own; group 1: swa.0 -> other, swa.1 -> shared
    for t, moves in ((shared, {7: 3, 8: 4, 13: 10, 14: 11}), (own, {7: 3, 8: 4}), (other, {13: 10, 14: 11})):
        for b in range(16):
            assert torch.equal(block_bytes(t, b), before[id(t)][moves.get(b, b)]), (b, moves)


def test_pools_are_shared_only_with_pieces_of_the_same_shape():
    bs = 16
    l0 = build_layers(entries_of({"a": vllm_cpu_layer(8, bs)}, FullAttentionSpec(bs, 2, 16, 16)), num_slots=4)
    wider = entries_of({"b": vllm_cpu_layer(8, bs, heads=4)}, FullAttentionSpec(bs, 4, 16, 16), group=1)
    with pytest.raises(LayoutError, match="no pool of that shape"):
        build_layers(wider, num_slots=4, share_pools_with=l0)


@pytest.mark.parametrize("kind", ["mla", "flash_nhd"])
def test_other_layouts_copy_as_few_runs_as_their_memory_allows(kind):
    # MLA's block is contiguous: one run. Flash NHD keeps K and V planes apart: two runs.
    t = torch.randn((16, 16, 64) if kind == "mla" else (2, 16, 16, 2, 16)).to(torch.bfloat16)
    lay = KVLayout.of_tensor(t, MLA_DIMS if kind == "mla" else FLASH_NHD_DIMS)
    (p,), _ = plan_spans([Entry.of("l0", t, lay)])
    assert p.rows_per_block == (1 if kind == "mla" else 2)
