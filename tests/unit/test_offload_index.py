"""Slot pool, prefix index, pins and eviction policies of the CPU offload tier."""

from __future__ import annotations

import pytest

from kvconnect.backends.cpu_offload.index import SlotIndex
from kvconnect.backends.cpu_offload.policies import ARCPolicy, LRUPolicy, make_policy
from kvconnect.errors import ConfigError

pytestmark = pytest.mark.unit


def keys(*names: str) -> list[bytes]:
    return [n.encode() for n in names]


def stored(n: int, policy: str = "lru", names: str = "abcdefgh") -> tuple[SlotIndex, list[bytes], list[int]]:
    idx = SlotIndex(n, make_policy(policy, n))
    ks = keys(*names[:n])
    slots = idx.reserve(ks)
    idx.commit(slots, ks)
    return idx, ks, slots


def test_fresh_store_gets_contiguous_slots():
    idx = SlotIndex(8, LRUPolicy(8))
    assert idx.reserve(keys("a", "b", "c")) == [0, 1, 2]


def test_pending_store_is_never_a_hit():
    idx = SlotIndex(4, LRUPolicy(4))
    ks = keys("a", "b")
    slots = idx.reserve(ks)
    assert idx.ready_prefix(ks) == []
    assert ks[0] in idx  # but a second store of the same key is skipped
    idx.commit(slots, ks)
    assert idx.ready_prefix(ks) == slots


def test_ready_prefix_stops_at_first_gap():
    idx, ks, slots = stored(3)
    assert idx.ready_prefix([ks[0], b"zz", ks[2]]) == [slots[0]]
    assert idx.ready_prefix(ks, start=1) == slots[1:]
    assert idx.ready_prefix(ks, start=0, stop=2) == slots[:2]


def test_pending_slots_are_never_evicted():
    idx = SlotIndex(2, LRUPolicy(2))
    idx.reserve(keys("a", "b"))
    assert idx.reserve(keys("c")) == []
    assert idx.evictions == 0


def test_pinned_slot_is_not_evicted_and_returns_to_policy_when_unpinned():
    idx, ks, slots = stored(2)
    idx.pin([slots[1]])  # "a" is older, but pin the other to make it clear pins matter
    idx.pin([slots[0]])
    assert idx.reserve(keys("c")) == []
    idx.unpin([slots[0]])
    assert idx.reserve(keys("c")) == [slots[0]]
    assert ks[0] not in idx and ks[1] in idx
    assert idx.evictions == 1


def test_lru_evicts_least_recently_touched():
    idx, ks, slots = stored(3)
    # Admitted tail first: recency order c < b < a. Touching c leaves b the least recent.
    idx.touch([slots[2]])
    assert idx.reserve(keys("x")) == [slots[1]]


def test_commit_admits_chain_tail_first_so_prefix_survives_pressure():
    idx, ks, slots = stored(3)
    idx.reserve(keys("x"))
    assert ks[0] in idx and ks[1] in idx and ks[2] not in idx


def test_discard_of_pinned_slot_frees_it_on_last_unpin():
    idx, ks, slots = stored(2)
    idx.pin([slots[0]])
    idx.discard([slots[0]], [ks[0]])
    assert ks[0] not in idx
    assert idx.num_free == 0
    idx.unpin([slots[0]])
    assert idx.num_free == 1


def test_discard_ignores_slot_reused_for_another_key():
    idx, ks, slots = stored(2)
    idx.discard([slots[0]], [b"other"])
    assert ks[0] in idx


def test_commit_after_discard_does_not_resurrect():
    idx = SlotIndex(2, LRUPolicy(2))
    ks = keys("a")
    s = idx.reserve(ks)
    idx.discard(s, ks)
    s2 = idx.reserve(keys("b"))
    idx.commit(s, ks)  # stale completion of the first store
    assert idx.ready_prefix(ks) == [] and idx.ready_prefix(keys("b")) == []
    assert s2 == s


def test_arc_keeps_frequently_used_entry_over_newer_one_shot_entries():
    idx, ks, slots = stored(3, policy="arc")
    idx.touch([slots[0]])  # "a" is now frequent (T2)
    idx.reserve(keys("x"))  # evicts from T1 ("b" or "c"), never "a"
    idx.reserve(keys("y"))
    assert ks[0] in idx


def test_arc_ghost_hit_grows_recency_target():
    p = ARCPolicy(2)
    for k in keys("a", "b"):
        p.admit(k)
    assert p.evict() == b"a"  # T1 victim goes to ghost list B1
    p.admit(b"a")  # came back: T1 should have been bigger
    assert p.p >= 1
    assert len(p) == 2


def test_arc_detached_entry_is_not_evicted():
    p = ARCPolicy(4)
    p.admit(b"a")
    p.detach(b"a")
    assert p.evict() is None
    p.attach(b"a")
    assert p.evict() == b"a"


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="eviction_policy"):
        make_policy("fifo", 4)
