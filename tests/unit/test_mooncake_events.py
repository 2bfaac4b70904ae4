"""KV cache events of the Mooncake shared tier (on FakeMooncakeDistributedStore): what this
instance stored is published as stored once its store completes, and withdrawn when this instance
learns the object is gone (a lookup finds it missing, a load of it fails, the store goes away)."""

from __future__ import annotations

import hashlib

import pytest

from kvconnect.api import RequestView
from kvconnect.events import LOCALITY_REMOTE, MEDIUM_STORAGE, BlocksRemoved, BlocksStored
from tests.fakes import fake_mooncake
from tests.unit.mooncake_harness import BS, config, make_instance

pytestmark = pytest.mark.unit

PROMPT = list(range(3000, 3000 + 6 * BS + 5))  # 6 full blocks and a partial one
BLOCKS = list(range(1, 8))


def engine_hashes(tokens: list[int]) -> list[bytes]:
    """Chained block hashes, as an engine computes them (vLLM: sha256 of parent and tokens)."""
    out: list[bytes] = []
    prev = b""
    for i in range(len(tokens) // BS):
        prev = hashlib.sha256(prev + repr(tokens[i * BS : (i + 1) * BS]).encode()).digest()
        out.append(prev)
    return out


HASHES = engine_hashes(PROMPT)


def req(rid: str, prompt: list[int] = PROMPT) -> RequestView:
    return RequestView(rid, prompt, block_hashes=engine_hashes(prompt))


@pytest.fixture
def instances(master):
    made = []

    def make(**kw):
        kw.setdefault("kv_events", True)
        inst = make_instance(config(master, **kw.pop("cfg", {})), **kw)
        made.append(inst)
        return inst

    yield make
    for inst in made:
        inst.shutdown()


def removed(events) -> set[bytes]:
    return {h for e in events if isinstance(e, BlocksRemoved) for h in e.block_hashes}


def object_of_block(inst, i: int) -> str:
    """The store key of block ``i`` of PROMPT served with BLOCKS (found by its stored bytes)."""
    head = inst.kv[0][BLOCKS[i]].numpy().tobytes()[:16]
    return next(k for k, v in fake_mooncake.cluster.objects.items() if v[:16] == head)


def test_a_completed_store_publishes_block_stored_with_the_engines_hashes_as_remote_storage(instances):
    a = instances()
    a.serve_and_store(req("r1"), BLOCKS)
    (ev,) = a.sched.take_events()
    assert isinstance(ev, BlocksStored)
    assert (ev.medium, ev.locality, ev.ownership) == (MEDIUM_STORAGE, LOCALITY_REMOTE, "mooncake")
    assert ev.block_hashes == tuple(HASHES[:6]) and ev.parent_block_hash is None
    assert ev.token_ids == tuple(PROMPT[: 6 * BS]) and ev.block_size == BS and ev.group == 0
    assert a.sched.take_events() == []


def test_nothing_is_published_before_the_store_completes(instances):
    a = instances()
    r = req("r1")
    a.sched.update_state_after_alloc(r, (BLOCKS,), 0)
    from kvconnect.api import ScheduledRequest, StepView

    a.step(StepView(scheduled=[ScheduledRequest("r1", (BLOCKS,), 0, len(PROMPT), True)]))
    a.compute(r, BLOCKS)
    assert a.sched.request_finished(r, (BLOCKS,))[0]
    assert a.sched.take_events() == []  # planned, not in the store yet
    a.wait_for(lambda out: "r1" in out.finished_sending)
    assert [type(e) for e in a.sched.take_events()] == [BlocksStored]


def test_a_failed_store_publishes_nothing(instances):
    a = instances()
    fake_mooncake.cluster.put_code = fake_mooncake.NO_AVAILABLE_HANDLE
    out = a.serve_and_store(req("r1"), BLOCKS)
    assert "r1" in out.failed_sending
    assert a.sched.take_events() == []


def test_blocks_already_published_are_not_published_again(instances):
    a = instances()
    a.serve_and_store(req("r1"), BLOCKS)
    a.sched.take_events()
    a.serve_and_store(req("r2"), list(range(10, 17)))
    assert a.sched.take_events() == []


def test_an_object_another_instance_stored_first_is_published_by_the_instance_whose_store_found_it(instances):
    a, b = instances(engine_id="a"), instances(engine_id="b")
    a.serve_and_store(req("r1"), BLOCKS)
    b.serve_and_store(req("r2"), list(range(10, 17)))  # finds every object present
    (ev,) = b.sched.take_events()
    assert isinstance(ev, BlocksStored) and ev.block_hashes == tuple(HASHES[:6])


def test_a_lookup_that_finds_a_published_object_missing_publishes_block_removed(instances):
    a = instances()
    a.serve_and_store(req("r1"), BLOCKS)
    a.sched.take_events()
    del fake_mooncake.cluster.objects[object_of_block(a, 2)]
    assert a.lookup(req("r2")) == (2 * BS, True)
    (ev,) = a.sched.take_events()
    assert isinstance(ev, BlocksRemoved) and ev.block_hashes == (HASHES[2],)
    assert (ev.medium, ev.locality, ev.ownership) == (MEDIUM_STORAGE, LOCALITY_REMOTE, "mooncake")


def test_a_missing_object_this_instance_never_published_publishes_nothing(instances):
    a, b = instances(engine_id="a"), instances(engine_id="b")
    a.serve_and_store(req("r1"), BLOCKS)
    del fake_mooncake.cluster.objects[object_of_block(a, 2)]
    assert b.lookup(req("r2")) == (2 * BS, True)
    assert b.sched.take_events() == []


def test_an_object_that_fails_verification_is_removed_and_withdrawn(instances):
    a = instances()
    a.serve_and_store(req("r1"), BLOCKS)
    a.sched.take_events()
    r = req("r2")
    assert a.lookup(r) == (6 * BS, True)
    victim = object_of_block(a, 3)
    data = bytearray(fake_mooncake.cluster.objects[victim])
    data[100] ^= 0xFF
    fake_mooncake.cluster.objects[victim] = bytes(data)
    blocks = list(range(10, 17))
    a.sched.update_state_after_alloc(r, (blocks,), 6 * BS)
    a.wait_for(lambda out: "r2" in out.finished_recving)
    assert victim not in fake_mooncake.cluster.objects
    assert removed(a.sched.take_events()) == {HASHES[3]}


def test_the_store_becoming_unreachable_withdraws_everything_published(instances):
    a = instances()
    a.serve_and_store(req("r1"), BLOCKS)
    a.sched.take_events()
    fake_mooncake.cluster.down = True
    assert a.lookup(req("r2")) == (0, False)
    assert removed(a.sched.take_events()) == set(HASHES[:6])
    assert a.sched.take_events() == []


def test_no_events_when_the_engine_publishes_none(instances):
    a = instances(kv_events=False)
    a.serve_and_store(req("r1"), BLOCKS)
    assert a.sched._events is None and a.sched.take_events() == []


def test_a_failed_store_of_a_published_prefix_withdraws_nothing(instances):
    a = instances()
    a.serve_and_store(req("r1"), BLOCKS)
    a.sched.take_events()
    longer = PROMPT + list(range(7000, 7000 + 2 * BS))
    fake_mooncake.cluster.put_code = fake_mooncake.NO_AVAILABLE_HANDLE
    out = a.serve_and_store(req("r2", longer), list(range(10, 19)))
    assert "r2" in out.failed_sending  # its two new blocks could not be put
    assert a.sched.take_events() == []  # the six published ones are still in the store
