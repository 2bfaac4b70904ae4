"""Worker half of the CPU offload tier: real tensors, copies, key checks, checksums."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvconnect.api import EngineInfo
from kvconnect.backends.cpu_offload import CpuOffloadWorker
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadStepMetadata, StoreJob
from kvconnect.backends.cpu_offload.rows import Entry, plan_memory
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError, LayoutError
from kvconnect.layout import FLASH_HND_DIMS, KVLayout
from kvconnect.telemetry import merge_stats
from tests.unit.offload_harness import LAYOUTS, block_view, make_cache

pytestmark = pytest.mark.unit

BS = 4


def worker(caches, capacity=1 << 20, **kw) -> CpuOffloadWorker:
    w = CpuOffloadWorker(
        CpuOffloadConfig(cpu_bytes_to_use=capacity, **kw), EngineInfo("e", block_sizes=(BS,))
    )
    w.register_kv_caches(caches)
    return w


def random_caches(kind: str, layers: int = 3, blocks: int = 16):
    out = {}
    for i in range(layers):
        t = make_cache(kind, blocks, BS)
        t.copy_(torch.randn(t.shape).to(t.dtype))
        out[f"l{i}"] = (t, KVLayout.of_tensor(t, LAYOUTS[kind]))
    return out


def run_step(w: CpuOffloadWorker, meta: OffloadStepMetadata, timeout: float = 5.0):
    """One engine step, then poll until every job of the step reported."""
    w.bind_step_metadata(meta)
    w.start_load_kv()
    w.wait_for_save()
    res = w.get_transfer_results(set())
    w.clear_step_metadata()
    deadline = time.monotonic() + timeout
    while w._inflight or (meta.closed and not res.finished_sending):
        assert time.monotonic() < deadline, "worker did not finish"
        time.sleep(0.001)
        more = w.get_transfer_results(set())
        res.finished_sending |= more.finished_sending
        res.finished_recving |= more.finished_recving
        res.failed_recving |= more.failed_recving
        res.failed_sending |= more.failed_sending
        res.invalid_block_ids |= more.invalid_block_ids
        if more.stats:
            res.stats = res.stats or {}
            merge_stats(res.stats, more.stats)
    return res


def store(w, rid, blocks, slots, keys):
    return run_step(
        w,
        OffloadStepMetadata(
            stores=[StoreJob(request_id=rid, block_ids=blocks, slots=slots, keys=keys)], closed=[rid]
        ),
    )


def load(w, rid, blocks, slots, keys):
    return run_step(
        w, OffloadStepMetadata(loads=[LoadJob(request_id=rid, block_ids=blocks, slots=slots, keys=keys)])
    )


def snapshot(caches, kind, blocks):
    return [[block_view(t, LAYOUTS[kind], b).clone() for b in blocks] for t, _ in caches.values()]


@pytest.mark.parametrize("kind", ["mha", "mla", "vllm_cpu"])
def test_blocks_stored_then_loaded_into_other_block_ids_are_byte_identical(kind):
    caches = random_caches(kind)
    w = worker(caches)
    src, dst = [3, 9, 4, 12], [1, 14, 15, 0]
    keys = [b"k%d" % i for i in range(4)]
    want = snapshot(caches, kind, src)
    res = store(w, "a", src, [5, 6, 2, 7], keys)
    assert res.finished_sending == {"a"} and not res.failed_sending
    res = load(w, "b", dst, [5, 6, 2, 7], keys)
    assert res.finished_recving == {"b"} and not res.failed_recving
    got = snapshot(caches, kind, dst)
    for wl, gl in zip(want, got):
        for wb, gb in zip(wl, gl):
            assert torch.equal(wb.view(torch.int16), gb.view(torch.int16))
    w.shutdown()


@pytest.mark.parametrize("kind", ["mha", "vllm_cpu"])
def test_copy_threads_split_large_copies_and_stay_byte_identical(kind, monkeypatch):
    from kvconnect.backends.cpu_offload import copier

    monkeypatch.setattr(copier, "SPLIT_MIN_BYTES", 1)  # split even these small tasks
    calls = []
    real = copier._run_moves

    def spy(kind_, moves):
        calls.append((kind_, threading.current_thread().name))
        real(kind_, moves)

    monkeypatch.setattr(copier, "_run_moves", spy)
    caches = random_caches(kind, blocks=32)
    w = worker(caches, copy_threads=3)
    src, dst = [3, 9, 4, 12, 30, 31, 7, 8, 20], [1, 14, 15, 0, 2, 5, 6, 28, 29]
    slots = [5, 6, 2, 7, 8, 9, 0, 1, 3]
    keys = [b"k%d" % i for i in range(len(src))]
    want = snapshot(caches, kind, src)
    assert not store(w, "a", src, slots, keys).failed_sending
    assert not load(w, "b", dst, slots, keys).failed_recving
    for wl, gl in zip(want, snapshot(caches, kind, dst)):
        for wb, gb in zip(wl, gl):
            assert torch.equal(wb.view(torch.int16), gb.view(torch.int16))
    # Each copy went out in three shares, and not all on one thread (an idle helper may take two).
    assert sorted(k for k, _ in calls) == ["load"] * 3 + ["store"] * 3
    assert len({t for _, t in calls}) >= 2, calls
    w.shutdown()


def test_split_gives_every_row_to_exactly_one_share():
    import numpy as np

    from kvconnect.backends.cpu_offload.copier import _split

    e = np.zeros((10, 4), np.uint8)
    moves = [(e, np.arange(7), np.zeros((7, 4), np.uint8)), (e, np.arange(2), np.zeros((2, 4), np.uint8))]
    shares = _split(moves, 3)
    assert len(shares) == 3
    for _, r, p in moves:
        got = np.concatenate([m[1] for sh in shares for m in sh if m[0] is e and np.shares_memory(m[2], p)])
        assert sorted(got.tolist()) == r.tolist()


def test_permuted_and_padded_layouts_round_trip():
    # HND described over a tensor stored NHD (permuted strides) and a padded feature row.
    base = torch.randn(2, 8, BS, 3, 16).to(torch.bfloat16)  # kv, block, token, head, feat
    hnd = base.permute(0, 1, 3, 2, 4)  # dims kv, block, head, token, feature (non-contiguous)
    padded = torch.randn(8, BS, 24).to(torch.bfloat16)[:, :, :20]  # MLA row padded to 24
    caches = {"hnd": (hnd, KVLayout.of_tensor(hnd, FLASH_HND_DIMS)),
              "pad": (padded, KVLayout.of_tensor(padded, ("block", "token", "feature")))}
    assert plan_memory([Entry.of("hnd", *caches["hnd"])]) is not None  # row path: one row per K/V plane
    assert (
        plan_memory([Entry.of("pad", *caches["pad"])]) is None
    )  # fallback (padding does not split into rows)
    w = CpuOffloadWorker(CpuOffloadConfig(cpu_bytes_to_use=1 << 20), EngineInfo("e", block_sizes=(BS,)))
    w.register_kv_caches(caches)
    want = [hnd[:, [1, 2]].clone(), padded[[1, 2]].clone()]
    store(w, "a", [1, 2], [0, 1], [b"x", b"y"])
    load(w, "b", [6, 5], [0, 1], [b"x", b"y"])
    assert torch.equal(hnd[:, [6, 5]], want[0]) and torch.equal(padded[[6, 5]], want[1])
    w.shutdown()


def test_load_of_slot_overwritten_meanwhile_fails_cleanly_without_copying():
    caches = random_caches("mha")
    w = worker(caches)
    store(w, "a", [1], [0], [b"old"])
    store(w, "c", [2], [0], [b"new"])  # slot 0 evicted and reused
    before = snapshot(caches, "mha", [9])
    res = load(w, "b", [9], [0], [b"old"])
    assert res.finished_recving == {"b"} and res.failed_recving == {"b"}
    assert res.invalid_block_ids == {9}
    assert all(torch.equal(x[0], y[0]) for x, y in zip(before, snapshot(caches, "mha", [9])))
    w.shutdown()


def test_checksum_mismatch_fails_the_load():
    caches = random_caches("mla")
    w = worker(caches, verify_checksums=True)
    store(w, "a", [1, 2], [0, 1], [b"x", b"y"])
    w.layers[0].pool[1].view(torch.uint8)[0] ^= 0xFF  # host memory corrupted
    res = load(w, "b", [5, 6], [0, 1], [b"x", b"y"])
    assert res.failed_recving == {"b"} and res.invalid_block_ids == {5, 6}
    w.shutdown()


def test_scheduler_error_job_is_reported_failed():
    w = worker(random_caches("mha"))
    res = run_step(
        w,
        OffloadStepMetadata(loads=[LoadJob(request_id="b", block_ids=[3, 4], slots=[], keys=[], error="x")]),
    )
    assert res.failed_recving == {"b"} and res.invalid_block_ids == {3, 4}
    w.shutdown()


def test_store_with_bad_block_id_is_reported_failed():
    w = worker(random_caches("mha", blocks=4))
    res = store(w, "a", [99], [0], [b"x"])
    assert res.finished_sending == {"a"} and res.failed_sending == {"a"}
    assert w._slot_keys[0] is None
    w.shutdown()


def test_handshake_reports_block_bytes_and_slot_count():
    caches = random_caches("vllm_cpu", layers=2)
    per_block = sum(lay.block_bytes for _, lay in caches.values())
    w = worker(caches, capacity=10 * per_block + 7)
    hs = w.get_handshake_metadata()
    assert (hs.kv_bytes_per_block, hs.num_slots) == (per_block, 10)
    assert w.layers[0].pool.shape == (10, caches["l0"][1].block_bytes)  # the block's bytes, as in the engine
    w.shutdown()


def test_worker_capacity_below_one_block_is_a_config_error():
    caches = random_caches("mha", layers=1)
    with pytest.raises(ConfigError, match="smaller than one KV block"):
        worker(caches, capacity=caches["l0"][1].block_bytes - 1)


def test_worker_refuses_a_layer_in_a_group_the_engine_did_not_announce():
    t1, t2 = make_cache("mha", 4, BS), make_cache("mha", 4, BS)
    caches = {"a": (t1, KVLayout.of_tensor(t1, LAYOUTS["mha"])),
              "b": (t2, KVLayout.of_tensor(t2, LAYOUTS["mha"], group=1))}
    with pytest.raises(LayoutError, match="layer b is in KV-cache group 1; the engine has 1"):
        worker(caches)


def test_worker_stats_count_bytes_and_blocks():
    caches = random_caches("mla")
    w = worker(caches)
    res = store(w, "a", [1, 2], [0, 1], [b"x", b"y"])
    per = w.kv_bytes_per_block
    assert res.stats["store_bytes"] == 2 * per and res.stats["store_blocks"] == 2
    w.shutdown()
