"""The mooncake backend's staging path with the engine's KV on a CUDA device (pinned host buffer,
gather/scatter on the device, DMA on the staging streams), on FakeMooncakeDistributedStore, random
bytes compared byte for byte, for vLLM-CPU and FlashAttention layouts (a layer whose block is
several runs). Every test also runs on CPU tensors with ``staging="always"``, as a unit test."""

from __future__ import annotations

import os
import time

import pytest
import torch

from kvconnect.api import EngineInfo
from kvconnect.backends.mooncake import MooncakeWorker
from kvconnect.backends.mooncake.messages import MooncakeStepMetadata, StoreLoad, StoreSave
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, VLLM_CPU_DIMS, KVLayout
from tests.fakes import fake_mooncake
from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore
from tests.unit.mooncake_harness import FakeMaster, config

DEVICES = [pytest.param("cpu", marks=pytest.mark.unit, id="host"),
           pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
BS, NB = 16, 24
SHAPES = {
    VLLM_CPU_DIMS: (NB, 4, BS, 64),
    FLASH_NHD_DIMS: (2, NB, BS, 4, 32),
    FLASH_HND_DIMS: (2, NB, 4, BS, 32),
}


@pytest.fixture
def master():
    fake_mooncake.cluster.reset()
    m = FakeMaster()
    yield m
    m.close()
    fake_mooncake.cluster.reset()


def _caches(dims, device: str, layers: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        t = torch.empty(SHAPES[dims], dtype=torch.bfloat16, device=device)
        t.view(-1).view(torch.uint8).copy_(torch.randint(0, 256, (t.numel() * 2,), dtype=torch.uint8,
                                                         generator=gen))
        out[f"l{i}"] = (t, KVLayout.of_tensor(t, dims))
    return out


def _blocks(t: torch.Tensor, dims, ids) -> torch.Tensor:
    return t.movedim(dims.index("block"), 0)[list(ids)].contiguous().cpu().view(torch.uint8)


def _worker(master, caches, **cfg) -> MooncakeWorker:
    w = MooncakeWorker(config(master, **cfg), EngineInfo("g", block_sizes=(BS,)),
                       store_factory=FakeMooncakeDistributedStore)
    w.register_kv_caches(caches)
    return w


def _run(w: MooncakeWorker, meta: MooncakeStepMetadata, rid: str, kind: str, timeout_s: float = 30.0):
    w.bind_step_metadata(meta)
    w.start_load_kv()
    w.clear_step_metadata()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = w.get_transfer_results(set())
        if rid in (out.finished_recving if kind == "load" else out.finished_sending):
            return out
        time.sleep(0.002)
    raise AssertionError(f"{kind} {rid} not reported in {timeout_s} s")


def _staging(device: str) -> str:
    return "auto" if device == "cuda" else "always"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [VLLM_CPU_DIMS, FLASH_NHD_DIMS, FLASH_HND_DIMS], ids=["cpu", "nhd", "hnd"])
def test_staged_blocks_round_trip_byte_for_byte_in_chunks(master, device, dims):
    caches = _caches(dims, device)
    obj = sum(lay.block_bytes for _, lay in caches.values())
    # Room for 8 objects, 4 per lane: batches of 2, so 7 blocks move in 4 chunks each way.
    w = _worker(master, caches, staging=_staging(device), staging_buffer_bytes=8 * obj)
    try:
        assert w.io.staging is not None and w.io.batch == 2
        if device == "cuda":
            assert w.io.staging.buffer.is_pinned()
        src, dst = [3, 9, 4, 20, 21, 0, 7], [1, 22, 23, 10, 11, 12, 5]
        keys = [os.urandom(16) for _ in src]
        want = [_blocks(t, dims, src) for t, _ in caches.values()]
        out = _run(w, MooncakeStepMetadata(saves=[StoreSave(request_id="s", block_ids=src, keys=keys)],
                                           closed=["s"]), "s", "save")
        assert "s" not in out.failed_sending
        for t, _ in caches.values():
            t.movedim(dims.index("block"), 0)[dst] = 0
        out = _run(
            w, MooncakeStepMetadata(loads=[StoreLoad(request_id="l", block_ids=dst, keys=keys)]), "l", "load"
        )
        assert not out.invalid_block_ids
        for (t, _), wnt in zip(caches.values(), want):
            assert torch.equal(_blocks(t, dims, dst), wnt)
    finally:
        w.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_staged_objects_load_into_a_zero_copy_host_instance(master, device):
    """A GPU instance and a CPU instance of one layout share objects."""
    dims = FLASH_NHD_DIMS
    gpu_caches = _caches(dims, device)
    gpu = _worker(master, gpu_caches, staging=_staging(device))
    host_caches = _caches(dims, "cpu", seed=1)
    host = _worker(master, host_caches, staging="never")
    try:
        src, dst, keys = [2, 3, 4], [7, 8, 9], [os.urandom(16) for _ in range(3)]
        want = [_blocks(t, dims, src) for t, _ in gpu_caches.values()]
        _run(gpu, MooncakeStepMetadata(saves=[StoreSave(request_id="s", block_ids=src, keys=keys)],
                                       closed=["s"]), "s", "save")
        out = _run(host, MooncakeStepMetadata(loads=[StoreLoad(request_id="l", block_ids=dst, keys=keys)]),
                   "l", "load")
        assert not out.invalid_block_ids
        for (t, _), wnt in zip(host_caches.values(), want):
            assert torch.equal(_blocks(t, dims, dst), wnt)
    finally:
        gpu.shutdown()
        host.shutdown()


@pytest.mark.parametrize("device", DEVICES)
def test_a_corrupt_staged_object_never_reaches_the_device_blocks(master, device):
    dims = FLASH_NHD_DIMS
    caches = _caches(dims, device)
    w = _worker(master, caches, staging=_staging(device), batch_objects=2)
    try:
        src, dst, keys = [1, 2, 3, 4], [10, 11, 12, 13], [os.urandom(16) for _ in range(4)]
        want = [_blocks(t, dims, src) for t, _ in caches.values()]
        _run(w, MooncakeStepMetadata(saves=[StoreSave(request_id="s", block_ids=src, keys=keys)],
                                     closed=["s"]), "s", "save")
        name = w.io.prefix + keys[2].hex()
        data = bytearray(fake_mooncake.cluster.objects[name])
        data[len(data) // 2] ^= 0x01
        fake_mooncake.cluster.objects[name] = bytes(data)
        for t, _ in caches.values():
            t.movedim(dims.index("block"), 0)[dst] = 0
        out = _run(
            w, MooncakeStepMetadata(loads=[StoreLoad(request_id="l", block_ids=dst, keys=keys)]), "l", "load"
        )
        assert out.invalid_block_ids == {12, 13}
        for (t, _), wnt in zip(caches.values(), want):
            assert torch.equal(_blocks(t, dims, dst[:2]), wnt[:2])
            assert not _blocks(t, dims, dst[2:]).any()  # never written
    finally:
        w.shutdown()
