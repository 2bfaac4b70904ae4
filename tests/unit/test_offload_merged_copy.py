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
from kvconnect.config import CpuOffloadConfig
from kvconnect.layout import FLASH_NHD_DIMS, MLA_DIMS, KVLayout
from tests.unit.test_offload_worker import load, store

pytestmark = pytest.mark.unit


@dataclass
class FullAttentionSpec:
    """The fields of vLLM's ``FullAttentionSpec`` that ``layer_entries`` reads."""

    block_size: int
    num_kv_heads: int
    head_size: int
    head_size_v: int


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
    w = CpuOffloadWorker(CpuOffloadConfig(cpu_bytes_to_use=1 << 22, **kw), EngineInfo("e", block_sizes=(block_size,)))
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
def test_vllm_cpu_blocks_round_trip_byte_for_byte_and_the_pool_holds_the_engine_bytes(bs, threads, monkeypatch):
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
    assert all(torch.equal(x, block_bytes(t, b)) for x, b in zip(others, [b for b in range(16) if b not in (9, 11)]))
    w.shutdown()


def test_kv_cache_groups_sharing_memory_are_planned_apart_and_copy_their_own_block_ids():
    # vLLM's hybrid allocator shares one tensor between a layer of each KV-cache group; the groups
    # index it with their own block ids, so their entries must not merge across groups. A third
    # layer of group 0 has a tensor of its own.
    bs = 16
    shared = vllm_cpu_layer(16, bs, seed=1)
    own = vllm_cpu_layer(16, bs, seed=2)
    caches = {**entries_of({"full.0": shared, "full.1": own}, FullAttentionSpec(bs, 2, 16, 16), group=0),
              **entries_of({"swa.0": shared}, SlidingWindowSpec(bs, 2, 16, 16), group=1)}
    layers = build_layers(caches, num_slots=6)
    assert sorted((lc.group, lc.names) for lc in layers) == [
        (0, ("full.0.k", "full.0.v")), (0, ("full.1.k", "full.1.v")), (1, ("swa.0.k", "swa.0.v"))]
    assert all(lc.plan.rows_per_block == 1 for lc in layers)
    ids = {0: [3, 4, 5], 1: [10, 11, 12]}
    before = {b: block_bytes(shared, b) for b in range(16)}
    before_own = {b: block_bytes(own, b) for b in range(16)}
    copy_blocks(layers, "store", ids, [0, 1, 2])
    copy_blocks(layers, "load", {0: [7, 8, 9], 1: [13, 14, 15]}, [0, 1, 2])
    for s, d in zip(ids[0] + ids[1], [7, 8, 9, 13, 14, 15]):
        assert torch.equal(block_bytes(shared, d), before[s])
    for s, d in zip(ids[0], [7, 8, 9]):
        assert torch.equal(block_bytes(own, d), before_own[s])
    for b in (0, 1, 2, 6):  # blocks no group named are left alone
        assert torch.equal(block_bytes(shared, b), before[b]) and torch.equal(block_bytes(own, b), before_own[b])


@pytest.mark.parametrize("kind", ["mla", "flash_nhd"])
def test_other_layouts_copy_as_few_runs_as_their_memory_allows(kind):
    # MLA's block is contiguous: one run. Flash NHD keeps K and V planes apart: two runs.
    t = torch.randn((16, 16, 64) if kind == "mla" else (2, 16, 16, 2, 16)).to(torch.bfloat16)
    lay = KVLayout.of_tensor(t, MLA_DIMS if kind == "mla" else FLASH_NHD_DIMS)
    (p,), _ = plan_spans([Entry.of("l0", t, lay)])
    assert p.rows_per_block == (1 if kind == "mla" else 2)
