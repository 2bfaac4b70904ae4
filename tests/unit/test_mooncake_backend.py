"""The mooncake backend's flow on FakeMooncakeDistributedStore: cross-instance hits, namespacing,
verification, partial loads, a store that is down or stuck, and deadlines."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from kvconnect.api import RequestView
from tests.fakes import fake_mooncake
from tests.unit.mooncake_harness import BS, config, make_instance

PROMPT = list(range(1000, 1000 + 6 * BS + 5))  # 6 full blocks and a partial one


@pytest.fixture
def instances(master):
    made = []

    def make(**kw):
        cfg_kw = {k: kw.pop(k) for k in list(kw) if k not in ("layers", "model_name", "engine_id")}
        inst = make_instance(config(master, **cfg_kw), **kw)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.shutdown()


def _load(b, req, blocks, computed=0):
    n, is_async = b.lookup(req, computed)
    assert is_async or n == 0
    b.sched.update_state_after_alloc(req, (blocks,), n)
    out = b.wait_for(lambda r: req.request_id in r.finished_recving) if n else None
    return n, out


def test_a_prefix_stored_by_one_instance_loads_on_another_byte_for_byte(instances):
    a, b = instances(engine_id="a"), instances(engine_id="b")
    a.serve_and_store(RequestView("r1", PROMPT), [1, 2, 3, 4, 5, 6, 7])
    n, out = _load(b, RequestView("r2", PROMPT), [10, 11, 12, 13, 14, 15, 16])
    assert n == 6 * BS
    assert not out.invalid_block_ids
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:7], lb[10:16])


def test_lookup_first_answers_ask_again_then_the_hit(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    assert b.sched.get_num_new_matched_tokens(req, 0) == (None, False)
    assert b.lookup(req) == (6 * BS, True)


def test_the_hit_stops_before_the_block_holding_the_last_token(instances):
    a, b = instances(), instances()
    exact = PROMPT[: 6 * BS]  # the last token sits in block 5: only 5 blocks may be offered
    a.serve_and_store(RequestView("r1", exact), list(range(1, 7)))
    assert b.lookup(RequestView("r2", exact)) == (5 * BS, True)


def test_lookup_after_the_engines_own_prefix_counts_only_new_tokens(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    assert b.lookup(RequestView("r2", PROMPT), computed=2 * BS) == (4 * BS, True)


def test_another_model_never_sees_the_objects(instances):
    a, b = instances(model_name="model-a"), instances(model_name="model-b")
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    assert b.lookup(RequestView("r2", PROMPT)) == (0, False)


def test_a_different_cache_salt_misses(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    assert b.lookup(RequestView("r2", PROMPT, cache_salt="tenant-2")) == (0, False)


def test_blocks_already_in_the_store_are_not_put_again(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    puts = fake_mooncake.cluster.calls.get("batch_put_from_multi_buffers", 0)
    out = b.serve_and_store(RequestView("r2", PROMPT), list(range(10, 17)))
    assert fake_mooncake.cluster.calls.get("batch_put_from_multi_buffers", 0) == puts
    assert out.stats["objects_present"] == 6


def test_a_loaded_request_does_not_store_its_loaded_blocks_again(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    _load(b, req, list(range(10, 17)))
    delay, _ = b.sched.request_finished(req, (list(range(10, 17)),))
    meta = b.sched.build_step_metadata(__import__("kvconnect.api", fromlist=["StepView"]).StepView())
    assert delay and meta.saves == [] and meta.closed == ["r2"]


def test_a_corrupt_object_ends_the_load_at_the_last_good_block_and_is_removed(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    keys = sorted(fake_mooncake.cluster.objects)
    req = RequestView("r2", PROMPT)
    assert b.lookup(req) == (6 * BS, True)
    # Flip one payload byte of the object of block 3 (found by its stored bytes).
    target = next(
        k for k in keys if fake_mooncake.cluster.objects[k][:16] == a.kv[0][4].numpy().tobytes()[:16]
    )
    data = bytearray(fake_mooncake.cluster.objects[target])
    data[100] ^= 0xFF
    fake_mooncake.cluster.objects[target] = bytes(data)
    blocks = list(range(10, 17))
    b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
    out = b.wait_for(lambda r: "r2" in r.finished_recving)
    assert out.invalid_block_ids == set(blocks[3:6])
    assert "r2" not in out.failed_recving  # vLLM keeps the 3 good blocks
    assert target not in fake_mooncake.cluster.objects
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:4], lb[10:13])


def test_an_object_evicted_mid_prefix_ends_the_load_there(instances):
    a, b = instances(), instances()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    assert b.lookup(req) == (6 * BS, True)
    victim = next(k for k, v in fake_mooncake.cluster.objects.items()
                  if v[:16] == a.kv[0][2].numpy().tobytes()[:16])  # block 1
    del fake_mooncake.cluster.objects[victim]
    blocks = list(range(10, 17))
    b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
    out = b.wait_for(lambda r: "r2" in r.finished_recving)
    assert out.invalid_block_ids == set(blocks[1:6])
    assert b.sched.get_stats()["loads_invalid"] == 1


def test_an_object_of_another_layout_is_refused(instances):
    a, b = instances(layers=2), instances(layers=3)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    # Different layouts name different keys: a miss, never a load of foreign bytes.
    assert b.lookup(RequestView("r2", PROMPT)) == (0, False)


def test_store_down_lookups_miss_saves_are_dropped_and_it_comes_back(instances):
    a, b = instances(), instances()
    fake_mooncake.cluster.down = True
    req = RequestView("r1", PROMPT)
    t0 = time.monotonic()
    assert a.lookup(req) == (0, False)
    assert a.lookup(RequestView("r1b", PROMPT)) == (0, False)  # backing off: no call
    a.sched.update_state_after_alloc(req, (list(range(1, 8)),), 0)
    from kvconnect.api import ScheduledRequest, StepView

    a.step(StepView(scheduled=[ScheduledRequest("r1", (list(range(1, 8)),), 0, len(PROMPT), True)]))
    delay, _ = a.sched.request_finished(req, (list(range(1, 8)),))
    if delay:
        a.wait_for(lambda r: "r1" in r.finished_sending)
    assert time.monotonic() - t0 < 3.0
    assert not fake_mooncake.cluster.objects
    stats = a.sched.get_stats()
    assert stats["store_failures"] >= 1 and stats["saves_skipped"] + stats.get("save_failures", 0) >= 1
    fake_mooncake.cluster.down = False
    time.sleep(0.25)  # retry_interval_s
    a.serve_and_store(RequestView("r3", PROMPT), list(range(1, 8)))
    assert b.lookup(RequestView("r4", PROMPT)) == (6 * BS, True)


SENTINEL = -7.0


@pytest.fixture
def gets(monkeypatch):
    """Once ``armed``, every ``batch_get_into_multi_buffers`` of the fake store is held on ``gate``
    (as on a stopped memory holder) until the test sets it; ``returned`` records when each held
    call returned (after its last write into the buffers)."""
    real = fake_mooncake.FakeMooncakeDistributedStore.batch_get_into_multi_buffers
    rec = SimpleNamespace(armed=False, gate=threading.Event(), entered=threading.Event(), returned=[])

    def held(self, keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node=False):
        if not rec.armed:
            return real(self, keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node)
        rec.entered.set()
        assert rec.gate.wait(10), "the test never released the get"
        out = real(self, keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node)
        rec.returned.append(time.monotonic())
        return out

    monkeypatch.setattr(fake_mooncake.FakeMooncakeDistributedStore, "batch_get_into_multi_buffers", held)
    yield rec
    rec.gate.set()


def _until_reported(b, rid, release_at: float, gate: threading.Event) -> tuple[float, object]:
    """Engine steps until ``rid``'s load is reported, the held get released at ``release_at``."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if time.monotonic() >= release_at:
            gate.set()
        out = b.step()
        if rid in out.finished_recving:
            return time.monotonic(), out
        time.sleep(0.005)
    raise AssertionError(f"{rid}'s load was never reported")


def test_a_zero_copy_load_whose_get_is_in_flight_at_its_deadline_is_reported_only_when_it_returned(
    instances, gets
):
    a, b = instances(), instances(load_timeout_s=0.3)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    assert b.lookup(req) == (6 * BS, True)
    blocks = list(range(10, 17))
    for layer in b.kv:
        layer[10:17] = SENTINEL
    gets.armed = True
    t0 = time.monotonic()
    b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
    assert "r2" not in b.step().finished_recving and gets.entered.wait(2)
    t_report, out = _until_reported(b, "r2", t0 + 1.0, gets.gate)  # the get returns 0.7 s late
    assert gets.returned and gets.returned[-1] <= t_report  # every write landed before the report
    assert t_report - t0 >= 1.0
    # The get returned whole and verified: the late load is used, not recomputed.
    assert not out.invalid_block_ids
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:7], lb[10:16])
    for layer in b.kv:  # reported: nothing of this load writes into the engine's blocks any more
        layer[10:17] = SENTINEL
    assert b.sched.request_finished(req, (blocks,))[0]
    b.wait_for(lambda r: "r2" in r.finished_sending)
    time.sleep(0.1)
    for layer in b.kv:
        assert bool((layer[10:17] == SENTINEL).all())


def test_no_batch_starts_after_the_deadline_and_the_batch_in_flight_is_kept(instances, gets):
    a, b = instances(batch_objects=2), instances(batch_objects=2, load_timeout_s=0.3)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    assert b.lookup(req) == (6 * BS, True)
    blocks = list(range(10, 17))
    for layer in b.kv:
        layer[10:17] = SENTINEL
    gets.armed = True
    t0 = time.monotonic()
    b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
    t_report, out = _until_reported(b, "r2", t0 + 0.8, gets.gate)
    assert len(gets.returned) == 1 and gets.returned[0] <= t_report  # only the first batch ran
    assert out.invalid_block_ids == set(blocks[2:6])
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:3], lb[10:12])  # the batch in flight, verified
        assert bool((lb[12:16] == SENTINEL).all())  # never fetched
    assert b.sched.get_stats()["deadline_misses"] == 1


def test_a_load_still_queued_at_its_deadline_fails_then_without_a_call(instances, gets):
    a, b = instances(), instances(load_timeout_s=0.3)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    first, queued = RequestView("r2", PROMPT), RequestView("r3", PROMPT)
    assert b.lookup(first) == (6 * BS, True) and b.lookup(queued) == (6 * BS, True)
    for layer in b.kv:
        layer[20:27] = SENTINEL
    gets.armed = True
    t0 = time.monotonic()
    b.sched.update_state_after_alloc(first, (list(range(10, 17)),), 6 * BS)
    b.sched.update_state_after_alloc(queued, (list(range(20, 27)),), 6 * BS)
    out = b.wait_for(lambda r: "r3" in r.finished_recving, timeout_s=3.0)  # behind r2's held get
    assert time.monotonic() - t0 < 2.0
    assert out.invalid_block_ids == set(range(20, 26)) and "r2" not in out.finished_recving
    gets.gate.set()
    b.wait_for(lambda r: "r2" in r.finished_recving)
    assert len(gets.returned) == 1  # r3 made no call
    for layer in b.kv:
        assert bool((layer[20:27] == SENTINEL).all())


def test_a_lookup_not_answered_in_time_is_a_miss(instances):
    b = instances(lookup_timeout_s=0.05)
    entered = threading.Event()
    release = threading.Event()
    real = fake_mooncake.FakeMooncakeDistributedStore.batch_is_exist

    def slow(self, keys):
        entered.set()
        release.wait(5)
        return real(self, keys)

    fake_mooncake.FakeMooncakeDistributedStore.batch_is_exist = slow
    try:
        req = RequestView("r1", PROMPT)
        assert b.sched.get_num_new_matched_tokens(req, 0) == (None, False)
        assert entered.wait(2)
        time.sleep(0.1)
        assert b.sched.get_num_new_matched_tokens(req, 0) == (0, False)
        assert b.sched.get_stats()["lookup_timeouts"] == 1
    finally:
        release.set()
        fake_mooncake.FakeMooncakeDistributedStore.batch_is_exist = real


def test_accepting_tokens_without_a_known_hit_fails_the_load_cleanly(instances):
    b = instances()
    blocks = list(range(10, 17))
    b.sched.update_state_after_alloc(RequestView("r9", PROMPT), (blocks,), 2 * BS)
    out = b.wait_for(lambda r: "r9" in r.finished_recving)
    assert out.invalid_block_ids == set(blocks)


def test_batches_pipelined_two_objects_at_a_time_round_trip_and_stop_at_the_bad_block(instances):
    a, b = instances(batch_objects=2), instances(batch_objects=2)
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    assert len(fake_mooncake.cluster.objects) == 6
    n, out = _load(b, RequestView("r2", PROMPT), list(range(10, 17)))
    assert n == 6 * BS and not out.invalid_block_ids
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:7], lb[10:16])
    victim = next(k for k, v in fake_mooncake.cluster.objects.items()
                  if v[:16] == a.kv[0][5].numpy().tobytes()[:16])  # block 4: the third batch
    data = bytearray(fake_mooncake.cluster.objects[victim])
    data[-50] ^= 1  # a payload byte of its last layer
    fake_mooncake.cluster.objects[victim] = bytes(data)
    blocks = list(range(20, 27))
    n, out = _load(b, RequestView("r3", PROMPT), blocks)
    assert out.invalid_block_ids == set(blocks[4:6])


@pytest.mark.parametrize("n", [1, 5, 8, 9, 32, 33, 119])
@pytest.mark.parametrize("small_last", [False, True])
def test_batches_cover_the_job_in_order_with_a_small_unoverlapped_end(n, small_last):
    from kvconnect.backends.mooncake.transfer import StoreIO

    io = StoreIO.__new__(StoreIO)
    io.batch = 32
    spans = io.spans(n, small_last)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 < hi - lo <= 32 for lo, hi in spans)
    if n > 8:  # the batch that no transfer overlaps is a quarter batch
        end = spans[-1] if small_last else spans[0]
        assert end[1] - end[0] == 8
