"""Scheduler and workers of the CPU offload tier driven together, in the engine's call order."""

from __future__ import annotations

import time

import pytest

from kvconnect.config import CpuOffloadConfig
from tests.unit.offload_harness import OffloadEngine

pytestmark = pytest.mark.unit

BS = 4


@pytest.fixture
def make():
    engines = []

    def _make(capacity_blocks: int = 64, **kw) -> OffloadEngine:
        opts = {
            k: kw.pop(k)
            for k in ("eviction_policy", "store_mode", "verify_checksums", "hash_salt", "per_rank")
            if k in kw
        }
        probe = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=1 << 30), **kw)
        per_block = probe.workers[0].kv_bytes_per_block * probe.tp_size
        probe.shutdown()
        e = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=capacity_blocks * per_block, **opts), **kw)
        engines.append(e)
        return e

    yield _make
    for e in engines:
        e.shutdown()


def prompt(n: int, start: int = 1) -> list[int]:
    return list(range(start, start + n))


@pytest.mark.parametrize("kind", ["mha", "mla", "vllm_cpu"])
def test_second_request_with_same_prefix_loads_exact_kv(make, kind):
    e = make(kind=kind)
    assert e.run("a", prompt(22)) == 0
    assert e.add("b", prompt(22) + [999]) == 20
    e.drain()
    assert not e.requests["b"].load_failed
    assert e.blocks_match_truth("b", 6)


def test_loaded_blocks_land_in_different_block_ids(make):
    e = make()
    e.run("a", prompt(17))
    e.add("b", prompt(17))
    e.drain()
    assert e.requests["a"].blocks[:4] != e.requests["b"].blocks[:4]
    assert e.blocks_match_truth("b", 5)


def test_tensor_parallel_ranks_agree_on_slots_and_both_load(make):
    e = make(tp_size=2)
    assert e.sched.index.num_slots == e.workers[0].num_slots == e.workers[1].num_slots
    e.run("a", prompt(16))
    assert e.add("b", prompt(16)) == 12
    e.drain()
    assert e.blocks_match_truth("b", 4)


def test_slot_count_from_model_signature_hint_matches_workers(make):
    e = make(use_hint=True)
    assert e.sched.index.num_slots == e.workers[0].num_slots == 64


def test_different_cache_salts_do_not_share_hits(make):
    e = make()
    e.run("a", prompt(16), cache_salt="tenant-1")
    assert e.add("b", prompt(16), cache_salt="tenant-2") == 0
    assert e.add("c", prompt(16), cache_salt="tenant-1") == 12


def test_capacity_pressure_evicts_and_never_serves_wrong_kv(make):
    e = make(capacity_blocks=6, num_blocks=96)
    for i in range(6):  # 6 distinct prompts of 4 blocks each through a 6-slot tier
        e.run(f"r{i}", prompt(16, start=1000 * i + 1))
    stats = e.sched.get_stats()
    assert stats["evictions"] > 0 and stats["stored_now"] <= 6
    # The most recent prompt survives whole; an old one is (at least partly) gone.
    assert e.add("again5", prompt(16, start=5001)) == 12
    e.drain()
    assert e.blocks_match_truth("again5", 4)
    hit0 = e.add("again0", prompt(16, start=1))
    e.drain()
    assert hit0 < 12 and e.blocks_match_truth("again0", 4)


def test_arc_policy_end_to_end(make):
    e = make(capacity_blocks=8, eviction_policy="arc")
    e.run("a", prompt(16))
    for i in range(3):
        e.add(f"hit{i}", prompt(16))
        e.drain()
    for i in range(4):  # one-shot prompts pass through
        e.run(f"scan{i}", prompt(12, start=100 * (i + 1)))
    assert e.add("z", prompt(16)) == 12  # the frequently hit prefix survived the scan


def test_fill_mode_stores_during_steps(make):
    e = make(store_mode="fill")
    e.add("a", prompt(16))
    deadline = time.monotonic() + 5
    while e.sched.get_stats().get("store_blocks", 0) < 4:  # copied during the steps, before finish
        assert time.monotonic() < deadline
        time.sleep(0.001)
        e.step()
    assert e.finish("a") is True  # stores from the step are still to be committed
    e.drain()
    assert e.add("b", prompt(16)) == 12


def test_checksums_pass_for_intact_blocks(make):
    e = make(verify_checksums=True)
    e.run("a", prompt(20))
    e.add("b", prompt(21))
    e.drain()
    assert not e.requests["b"].load_failed and e.blocks_match_truth("b", 5)


def test_preempted_request_waits_for_its_stores_and_completes(make):
    e = make(store_mode="fill")
    e.add("a", prompt(16))
    e.step()
    e.preempt("a")
    e.drain()  # rescheduled from scratch; the step after preemption waited for its copies
    e.finish("a")
    e.drain()
    assert e.add("b", prompt(16)) == 12
    e.drain()
    assert e.blocks_match_truth("b", 3)


def test_aborted_request_while_loading_keeps_blocks_until_load_done(make):
    e = make()
    e.run("a", prompt(16))
    e.add("b", prompt(16))
    assert e.finish("b", reason="abort") is True  # load in flight: blocks stay allocated
    e.drain()
    assert e.requests["b"].freed
    assert all(v == 0 for v in (e.sched.index.pins(s) for s in range(e.sched.index.num_slots)))


def test_stats_report_hits_misses_and_bytes(make):
    e = make()
    e.run("a", prompt(16))
    e.add("b", prompt(16))
    e.drain()
    s = e.sched.get_stats()
    assert s["hits"] == 1 and s["misses"] == 1 and s["hit_tokens"] == 12
    assert s["load_bytes"] == 3 * e.workers[0].kv_bytes_per_block
    assert s["store_bytes"] == 4 * e.workers[0].kv_bytes_per_block
