"""KV cache events of the CPU tier (kvconnect.events): what a router subscribing to the engine's
events learns about the tier, checked against the tier's own index."""

from __future__ import annotations

import hashlib
import random

import pytest

from kvconnect.api import RequestView
from kvconnect.backends.cpu_offload.hashing import _h, root_key
from kvconnect.backends.cpu_offload.index import SlotIndex
from kvconnect.backends.cpu_offload.policies import make_policy
from kvconnect.config import CpuOffloadConfig
from kvconnect.events import MEDIUM_CPU, BlocksRemoved, BlocksStored, TierEvents
from tests.unit.offload_harness import OffloadEngine

BS = 4


def engine_hashes(tokens: list[int], bs: int = BS) -> list[bytes]:
    """Chained hashes of full blocks, as an engine computes them (stand-in for vLLM's)."""
    out, prev = [], b"root"
    for i in range(len(tokens) // bs):
        prev = hashlib.sha256(prev + repr(tokens[i * bs:(i + 1) * bs]).encode()).digest()
        out.append(prev)
    return out


@pytest.fixture
def make():
    made = []

    def _make(capacity_blocks: int = 64, kv_events: bool = True) -> OffloadEngine:
        probe = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=1 << 30), block_size=BS)
        per_block = probe.workers[0].kv_bytes_per_block
        probe.shutdown()
        e = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=capacity_blocks * per_block), block_size=BS,
                          kv_events=kv_events)
        made.append(e)
        return e

    yield _make
    for e in made:
        e.shutdown()


def run(e: OffloadEngine, rid: str, tokens: list[int]) -> list[bytes]:
    hs = engine_hashes(tokens)
    e.run(rid, tokens, block_hashes=hs)
    return hs


class Subscriber:
    """What a router keeps from the events: the engine hashes the CPU tier holds."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()

    def apply(self, events) -> None:
        for ev in events:
            assert ev.medium == MEDIUM_CPU
            if isinstance(ev, BlocksStored):
                assert not self.held & set(ev.block_hashes), "stored twice without a removal between"
                self.held |= set(ev.block_hashes)
            elif isinstance(ev, BlocksRemoved):
                assert set(ev.block_hashes) <= self.held, "removed a block never stored"
                self.held -= set(ev.block_hashes)


def tier_truth(e: OffloadEngine, known: list[bytes]) -> set[bytes]:
    """Engine hashes whose tier key is a hit in the scheduler's index right now."""
    root = root_key(e.config.hash_salt, None, BS)
    idx = e.sched.index
    return {h for h in known if idx.ready_prefix([_h(root, h)])}


def test_stored_blocks_carry_engine_hashes_parent_tokens_and_medium(make):
    e = make()
    toks = list(range(100, 113))  # 3 full blocks + 1 token
    hs = run(e, "a", toks)
    events = e.sched.take_events()
    assert events == [BlocksStored(MEDIUM_CPU, tuple(hs[:3]), None, tuple(toks[:12]), BS,
                                   request=events[0].request, first_block=0)]
    assert events[0].request.request_id == "a"
    assert e.sched.take_events() == []  # taken once


def test_a_request_extending_a_stored_prefix_publishes_only_its_new_blocks_with_their_parent(make):
    e = make()
    base = list(range(100, 109))
    run(e, "a", base)
    e.sched.take_events()
    longer = base[:8] + list(range(200, 209))
    hs = run(e, "b", longer)
    (ev,) = e.sched.take_events()
    assert ev.block_hashes == tuple(hs[2:4]) and ev.parent_block_hash == hs[1] and ev.first_block == 2
    assert ev.token_ids == tuple(longer[8:16])


def test_eviction_under_capacity_pressure_publishes_removal_by_engine_hash(make):
    e = make(capacity_blocks=4)
    sub = Subscriber()
    ha = run(e, "a", list(range(100, 113)))
    sub.apply(e.sched.take_events())
    hb = run(e, "b", list(range(300, 313)))
    events = e.sched.take_events()
    removed = [ev for ev in events if isinstance(ev, BlocksRemoved)]
    assert removed and all(set(ev.block_hashes) <= set(ha) for ev in removed)
    sub.apply(events)
    assert sub.held == tier_truth(e, ha + hb)
    assert len(sub.held) == 4


def test_subscriber_index_equals_the_tier_across_random_stores_hits_and_evictions(make):
    e = make(capacity_blocks=10)
    sub = Subscriber()
    rnd = random.Random(7)
    prefixes = [[rnd.randrange(1000) for _ in range(rnd.choice((8, 12, 16)))] for _ in range(6)]
    known: set[bytes] = set()
    for i in range(40):
        toks = rnd.choice(prefixes) + [rnd.randrange(1000) for _ in range(rnd.randrange(0, 9))]
        known |= set(run(e, f"r{i}", toks))
        sub.apply(e.sched.take_events())
        assert sub.held == tier_truth(e, sorted(known)), f"after request {i}"
    assert e.sched.index.evictions > 0 and sub.held, "the workload never evicted: the test proves nothing"


def test_no_events_unless_the_engine_publishes_them(make):
    e = make(kv_events=False)
    run(e, "a", list(range(100, 113)))
    assert e.sched.take_events() == []


def test_requests_without_engine_hashes_publish_nothing(make):
    e = make()
    e.run("a", list(range(100, 113)))  # no block_hashes: keys are hashed from tokens
    assert e.sched.index.num_stored == 3
    assert e.sched.take_events() == []


def test_a_store_that_fails_publishes_nothing_and_a_dropped_hit_is_removed():
    ev = TierEvents(MEDIUM_CPU, BS)
    idx = SlotIndex(4, make_policy("lru", 4), ev)
    view = RequestView("a", list(range(12)), block_hashes=[b"h0", b"h1", b"h2"])
    keys = [b"k0", b"k1", b"k2"]
    slots = idx.reserve(keys)
    ev.planned(view, [0, 1, 2], keys)
    idx.discard(slots, keys)  # the store failed
    assert ev.take() == []
    slots = idx.reserve(keys)
    ev.planned(view, [0, 1, 2], keys)
    idx.commit(slots, keys)
    (stored,) = ev.take()
    assert stored.block_hashes == (b"h0", b"h1", b"h2")
    idx.discard(slots[2:], keys[2:])  # e.g. a load of it failed its checksum
    assert ev.take() == [BlocksRemoved(MEDIUM_CPU, (b"h2",))]
    ev.cleared()
    assert ev.take() == [BlocksRemoved(MEDIUM_CPU, (b"h0", b"h1"))]


def test_blocks_of_different_groups_are_published_apart():
    ev = TierEvents(MEDIUM_CPU, BS)
    view = RequestView("a", list(range(8)), block_hashes=[b"h0", b"h1"])
    ev.planned(view, [0, 1], [b"f0", b"f1"], group=0)
    ev.planned(view, [1], [b"s1"], group=1)
    ev.ready([b"f0", b"f1", b"s1"])
    a, b = ev.take()
    assert (a.group, a.block_hashes, b.group, b.block_hashes) == (0, (b"h0", b"h1"), 1, (b"h1",))
    ev.dropped([b"f1", b"s1"])
    assert ev.take() == [BlocksRemoved(MEDIUM_CPU, (b"h1",), 0), BlocksRemoved(MEDIUM_CPU, (b"h1",), 1)]


def test_non_consecutive_blocks_are_published_as_separate_runs():
    ev = TierEvents(MEDIUM_CPU, BS)
    view = RequestView("a", list(range(16)), block_hashes=[b"h0", b"h1", b"h2", b"h3"])
    ev.planned(view, [0, 2, 3], [b"k0", b"k2", b"k3"])
    ev.ready([b"k0", b"k2", b"k3"])
    a, b = ev.take()
    assert (a.block_hashes, a.parent_block_hash) == ((b"h0",), None)
    assert (b.block_hashes, b.parent_block_hash, b.token_ids) == ((b"h2", b"h3"), b"h1", tuple(range(8, 16)))
