"""CPU offload on a CUDA device: pinned host pool, copies on a dedicated stream."""

from __future__ import annotations

import time

import pytest
import torch

from kvconnect.api import EngineInfo
from kvconnect.backends.cpu_offload import CpuOffloadWorker
from kvconnect.backends.cpu_offload.copier import CudaStreamCopier
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadStepMetadata, StoreJob
from kvconnect.config import CpuOffloadConfig
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, KVLayout

pytestmark = pytest.mark.gpu

BS = 16


def _step(w, meta, expect, timeout=30.0):
    w.bind_step_metadata(meta)
    w.start_load_kv()
    w.wait_for_save()
    seen, failed = set(), set()
    deadline = time.monotonic() + timeout
    while len(seen) < expect:
        assert time.monotonic() < deadline
        r = w.get_transfer_results(set())
        seen |= r.finished_sending | r.finished_recving
        failed |= r.failed_recving | r.failed_sending
        time.sleep(0.001)
    w.clear_step_metadata()
    return failed


@pytest.mark.parametrize("dims", [FLASH_NHD_DIMS, FLASH_HND_DIMS, MLA_DIMS])
def test_cuda_round_trip_is_byte_identical_and_pool_is_pinned(dims):
    shape = {FLASH_NHD_DIMS: (2, 64, BS, 4, 64), FLASH_HND_DIMS: (2, 64, 4, BS, 64), MLA_DIMS: (64, BS, 576)}[dims]
    caches = {}
    for i in range(3):
        t = torch.randn(shape, device="cuda").to(torch.bfloat16)
        caches[f"l{i}"] = (t, KVLayout.of_tensor(t, dims))
    w = CpuOffloadWorker(CpuOffloadConfig(cpu_bytes_to_use=1 << 26, verify_checksums=True),
                         EngineInfo("g", block_sizes=(BS,)))
    w.register_kv_caches(caches)
    assert isinstance(w._copier, CudaStreamCopier)
    assert all(lc.pool.is_pinned() for lc in w.layers)
    src, dst, slots = [3, 9, 4, 40], [1, 50, 51, 0], [7, 8, 2, 30]
    keys = [b"a", b"b", b"c", b"d"]
    bd = dims.index("block")
    want = [t.movedim(bd, 0)[src].clone() for t, _ in caches.values()]
    assert not _step(w, OffloadStepMetadata(stores=[StoreJob(request_id="s", block_ids=src, slots=slots, keys=keys)],
                                            closed=["s"]), 1)
    assert not _step(w, OffloadStepMetadata(loads=[LoadJob(request_id="l", block_ids=dst, slots=slots, keys=keys)]), 1)
    torch.cuda.synchronize()
    for (t, _), wnt in zip(caches.values(), want):
        assert torch.equal(t.movedim(bd, 0)[dst], wnt)
    failed = _step(w, OffloadStepMetadata(loads=[LoadJob(request_id="x", block_ids=[5], slots=[7], keys=[b"zz"])]), 1)
    assert failed == {"x"}
    w.shutdown()


def test_load_then_store_into_the_same_slot_in_one_step_keeps_order():
    """Loads and stores share two streams (kernels, DMA): a store overwriting a slot that an
    earlier load of the same step reads must not race it."""
    shape = (2, 64, BS, 4, 64)
    caches = {}
    for i in range(2):
        t = torch.randn(shape, device="cuda").to(torch.bfloat16)
        caches[f"l{i}"] = (t, KVLayout.of_tensor(t, FLASH_NHD_DIMS))
    w = CpuOffloadWorker(CpuOffloadConfig(cpu_bytes_to_use=1 << 26), EngineInfo("g", block_sizes=(BS,)))
    w.register_kv_caches(caches)
    old_blocks, new_blocks, dst = list(range(0, 16)), list(range(16, 32)), list(range(32, 48))
    slots, keys = list(range(16)), [b"%d" % i for i in range(16)]
    assert not _step(w, OffloadStepMetadata(stores=[StoreJob(request_id="s0", block_ids=old_blocks, slots=slots,
                                                             keys=keys)], closed=["s0"]), 1)
    want = [t[:, old_blocks].clone() for t, _ in caches.values()]
    meta = OffloadStepMetadata(
        loads=[LoadJob(request_id="l", block_ids=dst, slots=slots, keys=keys)],
        stores=[StoreJob(request_id="s1", block_ids=new_blocks, slots=slots, keys=[b"n" + k for k in keys])],
        closed=["s1"],
    )
    assert not _step(w, meta, 2)
    torch.cuda.synchronize()
    for (t, _), wnt in zip(caches.values(), want):
        assert torch.equal(t[:, dst], wnt)  # the load read the slots before the store overwrote them
        pool = next(lc.pool for lc in w.layers if lc.engine is t)  # [slots, block bytes]: K plane, V plane
        got = t[:, new_blocks].movedim(1, 0).contiguous().cpu().view(torch.uint8).reshape(len(slots), -1)
        assert torch.equal(got, pool[slots])
    w.shutdown()
