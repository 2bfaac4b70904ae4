"""Scheduler half of the CPU offload tier, driven without workers (results are hand-made)."""

from __future__ import annotations

import pytest

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView, TransferResults
from kvconnect.backends.cpu_offload import CpuOffloadScheduler
from kvconnect.backends.cpu_offload.messages import OffloadHandshake
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError, LayoutError

pytestmark = pytest.mark.unit

BS = 4
BLOCK_BYTES = 100


def sched(slots: int = 16, **kw) -> CpuOffloadScheduler:
    cfg = CpuOffloadConfig(cpu_bytes_to_use=slots * BLOCK_BYTES, **kw)
    return CpuOffloadScheduler(
        cfg, EngineInfo("e", block_sizes=(BS,), model_signature={"kv_bytes_per_block": BLOCK_BYTES})
    )


def view(rid: str, n: int, start: int = 0, **kw) -> RequestView:
    return RequestView(rid, list(range(start, start + n)), **kw)


def compute_and_finish(s: CpuOffloadScheduler, v: RequestView, blocks: list[int], hit: int = 0):
    """Allocate, run one prefill step, finish; returns (delay_free, step metadata of the finish)."""
    s.update_state_after_alloc(v, [blocks], hit)
    s.build_step_metadata(
        StepView([ScheduledRequest(v.request_id, [blocks], hit, v.num_prompt_tokens - hit, True)])
    )
    delay, _ = s.request_finished(v, [blocks])
    return delay, s.build_step_metadata(StepView())


def store(s: CpuOffloadScheduler, v: RequestView, blocks: list[int]) -> None:
    delay, meta = compute_and_finish(s, v, blocks)
    assert delay and meta.stores
    s.update_worker_output(TransferResults(finished_sending={v.request_id}))


def test_miss_when_nothing_stored():
    assert sched().get_num_new_matched_tokens(view("a", 20), 0) == (0, False)


def test_finished_request_stores_its_full_blocks_and_delays_free():
    s = sched()
    delay, meta = compute_and_finish(s, view("a", 10), [7, 8, 9])
    assert delay
    assert [j.block_ids for j in meta.stores] == [[7, 8]]  # 10 tokens: two full blocks
    assert meta.closed == ["a"] and not meta.stores[0].after_forward


def test_stored_blocks_are_not_hits_until_the_store_completes():
    s = sched()
    compute_and_finish(s, view("a", 12), [0, 1, 2])
    assert s.get_num_new_matched_tokens(view("b", 13), 0) == (0, False)
    s.update_worker_output(TransferResults(finished_sending={"a"}))
    assert s.get_num_new_matched_tokens(view("b", 13), 0) == (12, True)


def test_hit_never_covers_the_whole_prompt():
    s = sched()
    store(s, view("a", 12), [0, 1, 2])
    # Same 12 tokens: the third block ends on the last token, so only two blocks are offered.
    assert s.get_num_new_matched_tokens(view("b", 12), 0) == (8, True)
    assert s.get_num_new_matched_tokens(view("c", 4), 0) == (0, False)


def test_hit_starts_after_locally_computed_tokens():
    s = sched()
    store(s, view("a", 16), [0, 1, 2, 3])
    assert s.get_num_new_matched_tokens(view("b", 17), 8) == (8, True)


def test_repeated_lookups_do_not_stack_pins():
    s = sched()
    store(s, view("a", 12), [0, 1, 2])
    for _ in range(3):
        s.get_num_new_matched_tokens(view("b", 13), 0)
    assert [s.index.pins(i) for i in range(3)] == [1, 1, 1]


def test_zero_external_tokens_releases_lookup_pins():
    s = sched()
    store(s, view("a", 12), [0, 1, 2])
    s.get_num_new_matched_tokens(view("b", 13), 0)
    s.update_state_after_alloc(view("b", 13), [[5, 6, 7, 8]], 0)
    assert [s.index.pins(i) for i in range(3)] == [0, 0, 0]


def test_accepted_hit_becomes_a_load_job_with_expected_keys():
    s = sched()
    store(s, view("a", 12), [0, 1, 2])
    v = view("b", 13)
    n, _ = s.get_num_new_matched_tokens(v, 0)
    s.update_state_after_alloc(v, [[5, 6, 7, 8]], n)
    meta = s.build_step_metadata(StepView())
    (job,) = meta.loads
    assert job.block_ids == [5, 6, 7] and job.slots == [0, 1, 2] and job.error is None
    assert job.keys == [s.index.key_of(i) for i in job.slots]
    s.update_worker_output(TransferResults(finished_recving={"b"}))
    assert [s.index.pins(i) for i in range(3)] == [0, 0, 0]
    assert s.get_stats()["hit_tokens"] == 12 and s.get_stats()["loaded_tokens"] == 12


def test_failed_load_drops_its_slots_from_the_index():
    s = sched()
    store(s, view("a", 12), [0, 1, 2])
    v = view("b", 13)
    n, _ = s.get_num_new_matched_tokens(v, 0)
    s.update_state_after_alloc(v, [[5, 6, 7, 8]], n)
    s.build_step_metadata(StepView())
    s.update_worker_output(
        TransferResults(finished_recving={"b"}, failed_recving={"b"}, invalid_block_ids={5})
    )
    assert s.get_num_new_matched_tokens(view("c", 13), 0) == (0, False)
    assert s.get_stats()["load_failures"] == 1


def test_alloc_without_a_pinned_hit_fails_the_load_cleanly():
    s = sched()
    s.update_state_after_alloc(view("b", 13), [[5, 6, 7, 8]], 8)
    (job,) = s.build_step_metadata(StepView()).loads
    assert job.error and job.slots == []


def test_blocks_already_stored_are_not_stored_again():
    s = sched()
    store(s, view("a", 8), [0, 1])
    delay, meta = compute_and_finish(s, view("b", 12), [4, 5, 6])
    assert [j.block_ids for j in meta.stores] == [[6]]


def test_failed_store_frees_its_slots():
    s = sched(slots=2)
    compute_and_finish(s, view("a", 8), [0, 1])
    s.update_worker_output(TransferResults(finished_sending={"a"}, failed_sending={"a"}))
    assert s.index.num_free == 2 and s.get_stats()["store_failures"] == 1


def test_store_under_pressure_evicts_least_recent_and_stops_when_all_pinned():
    s = sched(slots=3)
    store(s, view("a", 12), [0, 1, 2])  # fills the tier
    _, meta = compute_and_finish(s, view("b", 8, start=100), [3, 4])
    assert [j.block_ids for j in meta.stores] == [[3, 4]]
    assert s.get_stats()["evictions"] == 2
    # b's blocks are pending, a's first block is pinned by a lookup: nothing can be evicted.
    assert s.get_num_new_matched_tokens(view("x", 13), 0) == (4, True)
    delay, meta = compute_and_finish(s, view("c", 8, start=200), [5, 6])
    assert meta.stores == [] and delay is False
    assert s.get_stats()["skipped_stores"] == 2


def test_fill_mode_stores_blocks_as_they_fill():
    s = sched(store_mode="fill")
    v = view("a", 12)
    s.update_state_after_alloc(v, [[0, 1, 2]], 0)
    meta = s.build_step_metadata(StepView([ScheduledRequest("a", [[0, 1, 2]], 0, 6, True)]))
    assert [(j.block_ids, j.after_forward) for j in meta.stores] == [([0], True)]
    meta = s.build_step_metadata(StepView([ScheduledRequest("a", [[]], 6, 6, False)]))
    assert [j.block_ids for j in meta.stores] == [[1, 2]]
    assert s.request_finished(v, [[0, 1, 2]])[0] is True


def test_request_without_stores_is_freed_at_once():
    s = sched()
    v = view("a", 3)
    s.update_state_after_alloc(v, [[0]], 0)
    assert s.request_finished(v, [[0]]) == (False, None)


def test_slot_count_from_handshake_when_no_hint():
    cfg = CpuOffloadConfig(cpu_bytes_to_use=1000)
    s = CpuOffloadScheduler(cfg, EngineInfo("e", block_sizes=(BS,), tp_size=2))
    assert s.get_num_new_matched_tokens(view("a", 20), 0) == (0, False)  # not sized yet
    s.set_handshake_metadata(
        {r: OffloadHandshake(tp_rank=r, kv_bytes_per_block=100, num_slots=5) for r in (0, 1)}
    )
    assert s.index.num_slots == 5  # 1000 bytes over 2 ranks / 100


def test_handshake_disagreeing_with_hint_is_a_config_error():
    s = sched(slots=16)
    with pytest.raises(ConfigError):
        s.set_handshake_metadata({0: OffloadHandshake(tp_rank=0, kv_bytes_per_block=50, num_slots=32)})


@pytest.mark.parametrize("capacity", [0, -5])
def test_non_positive_capacity_is_a_config_error(capacity):
    with pytest.raises(ConfigError, match="cpu_bytes_to_use"):
        CpuOffloadScheduler(CpuOffloadConfig(cpu_bytes_to_use=capacity), EngineInfo("e"))


def test_capacity_below_one_block_is_a_config_error():
    with pytest.raises(ConfigError, match="smaller than one KV block"):
        CpuOffloadScheduler(CpuOffloadConfig(cpu_bytes_to_use=99),
                            EngineInfo("e", model_signature={"kv_bytes_per_block": 100}))


def test_unknown_policy_is_a_config_error_at_start():
    with pytest.raises(ConfigError, match="eviction_policy"):
        CpuOffloadScheduler(CpuOffloadConfig(cpu_bytes_to_use=1000, eviction_policy="fifo"), EngineInfo("e"))


def test_block_ids_of_more_groups_than_the_engine_announced_are_refused():
    s = sched()
    with pytest.raises(LayoutError, match="2 KV-cache groups; the engine announced 1"):
        s.update_state_after_alloc(view("a", 8), [[0, 1], [2, 3]], 0)
