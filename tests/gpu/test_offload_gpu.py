"""CPU offload with the engine's KV on a CUDA device (pinned host pool, gather/scatter kernels and
DMA on the copier's own streams), random bytes, compared byte for byte. Every test also runs with
the KV on the CPU (the thread copier), as a unit test, on every machine."""

from __future__ import annotations

import time

import pytest
import torch

from kvconnect.api import EngineInfo
from kvconnect.backends.cpu_offload import CpuOffloadWorker
from kvconnect.backends.cpu_offload.copier import CudaStreamCopier, ThreadCopier
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadStepMetadata, StoreJob
from kvconnect.config import CpuOffloadConfig
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, KVLayout
from tests.unit.offload_harness import OffloadEngine

DEVICES = [pytest.param("cpu", marks=pytest.mark.unit, id="host"),
           pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
BS = 16
SHAPES = {FLASH_NHD_DIMS: (2, 64, BS, 4, 64), FLASH_HND_DIMS: (2, 64, 4, BS, 64), MLA_DIMS: (64, BS, 576)}


def _random_caches(dims, device: str, layers: int = 3, seed: int = 0):
    """bf16 caches whose every byte is random (NaN patterns included): compare bytes, not values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        t = torch.empty(SHAPES[dims], dtype=torch.bfloat16, device=device)
        t.view(-1).view(torch.uint8).copy_(
            torch.randint(0, 256, (t.numel() * 2,), dtype=torch.uint8, generator=gen))
        out[f"l{i}"] = (t, KVLayout.of_tensor(t, dims))
    return out


def _blocks(t: torch.Tensor, dims, ids) -> torch.Tensor:
    """Bytes of blocks ``ids`` of one layer, on the CPU."""
    return t.movedim(dims.index("block"), 0)[list(ids)].contiguous().cpu().view(torch.uint8)


def _worker(caches, device: str, **cfg) -> CpuOffloadWorker:
    w = CpuOffloadWorker(
        CpuOffloadConfig(cpu_bytes_to_use=1 << 26, **cfg), EngineInfo("g", block_sizes=(BS,))
    )
    w.register_kv_caches(caches)
    if device == "cuda":
        assert isinstance(w._copier, CudaStreamCopier) and all(lc.pool.is_pinned() for lc in w.layers)
    else:
        assert isinstance(w._copier, ThreadCopier)
    return w


def _step(w, meta, expect: int, timeout: float = 30.0):
    """One engine step; waits until ``expect`` requests reported. Returns the failed receives."""
    w.bind_step_metadata(meta)
    w.start_load_kv()
    w.wait_for_save()
    seen, failed, invalid = set(), set(), set()
    deadline = time.monotonic() + timeout
    while len(seen) < expect:
        assert time.monotonic() < deadline, f"only {seen} of {expect} requests reported"
        r = w.get_transfer_results(set())
        seen |= r.finished_sending | r.finished_recving
        failed |= r.failed_recving | r.failed_sending
        invalid |= r.invalid_block_ids
        time.sleep(0.001)
    w.clear_step_metadata()
    return failed, invalid


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [FLASH_NHD_DIMS, FLASH_HND_DIMS, MLA_DIMS], ids=["nhd", "hnd", "mla"])
def test_random_blocks_stored_and_loaded_elsewhere_are_byte_identical(device, dims):
    caches = _random_caches(dims, device)
    w = _worker(caches, device, verify_checksums=True)
    # scattered blocks, slot runs and single slots; loads into other blocks
    src, slots = [3, 9, 4, 40, 41, 42, 63, 0], [7, 8, 2, 30, 31, 32, 33, 1]
    dst = [1, 50, 51, 10, 11, 12, 62, 5]
    keys = [b"k%d" % i for i in range(len(src))]
    want = [_blocks(t, dims, src) for t, _ in caches.values()]
    assert _step(
        w,
        OffloadStepMetadata(
            stores=[StoreJob(request_id="s", block_ids=src, slots=slots, keys=keys)], closed=["s"]
        ),
        1,
    ) == (set(), set())
    for t, _ in caches.values():
        t.movedim(dims.index("block"), 0)[dst] = 0  # a load that copied nothing would fail below
    _sync(device)
    assert _step(
        w, OffloadStepMetadata(loads=[LoadJob(request_id="l", block_ids=dst, slots=slots, keys=keys)]), 1
    ) == (set(), set())
    _sync(device)
    for (t, _), wnt, lc in zip(caches.values(), want, w.layers):
        assert torch.equal(_blocks(t, dims, dst), wnt)
        # the pool holds the same bytes, a slot per block ([slots, block bytes])
        assert torch.equal(lc.pool[slots].contiguous().view(torch.uint8).flatten(1), wnt.flatten(1))
    failed, invalid = _step(w, OffloadStepMetadata(loads=[LoadJob(request_id="x", block_ids=[5], slots=[7],
                                                                   keys=[b"zz"])]), 1)
    assert failed == {"x"} and invalid == {5}
    w.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_load_then_store_into_the_same_slot_in_one_step_keeps_order(device):
    """Loads and stores share the copier's streams (kernels, DMA): a store overwriting a slot
    that an earlier load of the same step reads must not race it."""
    caches = _random_caches(FLASH_NHD_DIMS, device, layers=2)
    w = _worker(caches, device)
    old_blocks, new_blocks, dst = list(range(0, 16)), list(range(16, 32)), list(range(32, 48))
    slots, keys = list(range(16)), [b"%d" % i for i in range(16)]
    assert _step(w, OffloadStepMetadata(stores=[StoreJob(request_id="s0", block_ids=old_blocks, slots=slots,
                                                         keys=keys)], closed=["s0"]), 1)[0] == set()
    want_old = [_blocks(t, FLASH_NHD_DIMS, old_blocks) for t, _ in caches.values()]
    want_new = [_blocks(t, FLASH_NHD_DIMS, new_blocks) for t, _ in caches.values()]
    meta = OffloadStepMetadata(
        loads=[LoadJob(request_id="l", block_ids=dst, slots=slots, keys=keys)],
        stores=[StoreJob(request_id="s1", block_ids=new_blocks, slots=slots, keys=[b"n" + k for k in keys])],
        closed=["s1"],
    )
    assert _step(w, meta, 2)[0] == set()
    _sync(device)
    for (t, _), old, new, lc in zip(caches.values(), want_old, want_new, w.layers):
        assert torch.equal(_blocks(t, FLASH_NHD_DIMS, dst), old)  # the load read the slots before the store
        assert torch.equal(lc.pool[slots].contiguous().view(torch.uint8).flatten(1), new.flatten(1))
    w.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_load_racing_the_eviction_of_its_slots_fails_and_copies_nothing(device):
    """A store reusing evicted slots is still in flight when a load that expects their old
    blocks is submitted: the load must fail whole (every block id invalid, not a byte copied);
    slots the store did not touch still load their own bytes."""
    caches = _random_caches(FLASH_NHD_DIMS, device, layers=2)
    w = _worker(caches, device)
    a_blocks, b_blocks, dst = list(range(0, 8)), list(range(8, 12)), list(range(40, 48))
    slots, keys = list(range(8)), [b"a%d" % i for i in range(8)]
    assert _step(w, OffloadStepMetadata(stores=[StoreJob(request_id="a", block_ids=a_blocks, slots=slots,
                                                         keys=keys)], closed=["a"]), 1)[0] == set()
    want_a = [_blocks(t, FLASH_NHD_DIMS, a_blocks) for t, _ in caches.values()]
    want_b = [_blocks(t, FLASH_NHD_DIMS, b_blocks) for t, _ in caches.values()]
    before = [_blocks(t, FLASH_NHD_DIMS, dst) for t, _ in caches.values()]
    # step 1: B's store into slots 0-3 is submitted and not waited for
    w.bind_step_metadata(
        OffloadStepMetadata(
            stores=[
                StoreJob(
                    request_id="b", block_ids=b_blocks, slots=slots[:4], keys=[b"b%d" % i for i in range(4)]
                )
            ],
            closed=["b"],
        )
    )
    w.start_load_kv()
    w.wait_for_save()
    w.clear_step_metadata()
    # step 2, at once: a load of A's 8 blocks, of which slots 0-3 are being overwritten
    failed, invalid = _step(
        w, OffloadStepMetadata(loads=[LoadJob(request_id="late", block_ids=dst, slots=slots, keys=keys)]), 2
    )
    assert failed == {"late"} and invalid == set(dst)
    _sync(device)
    for (t, _), b4 in zip(caches.values(), before):
        assert torch.equal(_blocks(t, FLASH_NHD_DIMS, dst), b4)
    # what survived the eviction loads its own bytes; the new occupant loads B's
    assert _step(w, OffloadStepMetadata(loads=[
        LoadJob(request_id="rest", block_ids=dst[4:], slots=slots[4:], keys=keys[4:]),
        LoadJob(request_id="new", block_ids=dst[:4], slots=slots[:4], keys=[b"b%d" % i for i in range(4)]),
    ]), 2)[0] == set()
    _sync(device)
    for (t, _), a, b in zip(caches.values(), want_a, want_b):
        assert torch.equal(_blocks(t, FLASH_NHD_DIMS, dst[4:]), a[4:])
        assert torch.equal(_blocks(t, FLASH_NHD_DIMS, dst[:4]), b)
    w.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_stores_needing_evictions_in_the_step_of_a_load_never_take_its_slots(device):
    """Scheduler and worker together: a prefix hit loads while, in the same step, another
    request's stores fill a full tier (fill mode) and must evict; the loaded KV is exact."""
    bs = 4
    probe = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=1 << 30), block_size=bs, num_blocks=96)
    per_block = probe.workers[0].kv_bytes_per_block
    probe.shutdown()
    e = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=6 * per_block, store_mode="fill"), block_size=bs,
                      num_blocks=96, device=device)
    try:
        e.run("a", list(range(1, 17)))  # 4 blocks stored in a 6-slot tier
        assert e.add("a2", list(range(1, 17))) == 12  # 3 blocks pinned, load planned
        assert e.add("b", list(range(5001, 5017))) == 0  # stores 4 blocks in the step of a2's load
        e.step()
        assert e.sched.get_stats()["evictions"] > 0
        assert e.add("a3", list(range(1, 17))) == 12  # the evicted blocks were not the pinned ones
        e.drain()
        for rid in ("a2", "a3"):
            assert not e.requests[rid].load_failed and e.blocks_match_truth(rid, 3)
        e.finish("b")
        e.drain()
        hit = e.add("b2", list(range(5001, 5017)))
        e.drain()
        assert hit > 0 and not e.requests["b2"].load_failed and e.blocks_match_truth("b2", hit // bs)
    finally:
        e.shutdown()
