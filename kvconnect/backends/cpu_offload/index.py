"""The scheduler's view of the host tier: a fixed pool of slots (one engine block each), the
prefix index mapping prefix keys to slots, and pins.

A slot is *pending* from the moment a store is planned into it until the workers report the store
complete; a pending slot is never offered as a hit and never evicted. A *ready* slot can be pinned
(a lookup or load in flight) any number of times; while pinned it is out of the eviction policy's
reach. Every operation is O(number of slots it names): none depends on how many blocks are stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from kvconnect.backends.cpu_offload.policies import EvictionPolicy

logger = logging.getLogger(__name__)


class IndexListener(Protocol):
    """Told what enters and leaves the tier (``kvconnect.events.TierEvents`` is one)."""

    def ready(self, keys: Sequence[bytes]) -> None: ...

    def dropped(self, keys: Sequence[bytes]) -> None: ...


class SlotIndex:
    def __init__(self, num_slots: int, policy: EvictionPolicy, listener: IndexListener | None = None) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self._slot_of: dict[bytes, int] = {}
        self._key_of: list[bytes | None] = [None] * num_slots
        self._ready = bytearray(num_slots)
        self._pins = [0] * num_slots
        #: Slots whose key was dropped while pinned: freed when the last pin goes.
        self._doomed: set[int] = set()
        # Popped from the end: hands out 0, 1, 2, ... first so fresh stores get contiguous slots.
        self._free = list(range(num_slots - 1, -1, -1))
        self.evictions = 0
        #: Told of keys that became hits (chain order) and of keys that left the index.
        self.listener = listener

    # -- queries ----------------------------------------------------------------------------------
    def __contains__(self, key: bytes) -> bool:
        """Stored or being stored."""
        return key in self._slot_of

    def ready_prefix(self, keys: Sequence[bytes], start: int = 0, stop: int | None = None) -> list[int]:
        """Slots of the longest run ``keys[start:stop]`` whose stores have completed."""
        stop = len(keys) if stop is None else min(stop, len(keys))
        out: list[int] = []
        for i in range(start, stop):
            s = self._slot_of.get(keys[i])
            if s is None or not self._ready[s]:
                break
            out.append(s)
        return out

    def key_of(self, slot: int) -> bytes | None:
        return self._key_of[slot]

    def pins(self, slot: int) -> int:
        return self._pins[slot]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_stored(self) -> int:
        return len(self._slot_of)

    # -- pins ---------------------------------------------------------------------------------------
    def pin(self, slots: Sequence[int]) -> None:
        for s in slots:
            if not self._ready[s]:
                raise ValueError(f"slot {s} is not ready and cannot be pinned")
            self._pins[s] += 1
            if self._pins[s] == 1:
                self.policy.detach(self._key_of[s])  # type: ignore[arg-type]

    def unpin(self, slots: Sequence[int]) -> None:
        for s in slots:
            if self._pins[s] <= 0:
                logger.error("cpu_offload: unpin of unpinned slot %d ignored", s)
                continue
            self._pins[s] -= 1
            if self._pins[s] == 0:
                if s in self._doomed:
                    self._doomed.discard(s)
                    self._release(s)
                elif self._ready[s]:
                    self.policy.attach(self._key_of[s])  # type: ignore[arg-type]

    def touch(self, slots: Sequence[int]) -> None:
        """Record a hit; the first block of a prefix ends up the most recent."""
        for s in reversed(slots):
            k = self._key_of[s]
            if k is not None:
                self.policy.touch(k)

    # -- stores -------------------------------------------------------------------------------------
    def reserve(self, keys: Sequence[bytes]) -> list[int]:
        """Pending slots for ``keys`` (absent keys, in chain order), evicting as needed. Returns
        slots for the longest prefix of ``keys`` that fits; the rest cannot be stored now."""
        out: list[int] = []
        evicted: list[bytes] = []
        for k in keys:
            if k in self._slot_of:
                raise ValueError("key is already stored or being stored")
            if self._free:
                s = self._free.pop()
            else:
                victim = self.policy.evict()
                if victim is None:
                    break
                s = self._slot_of.pop(victim)
                self._key_of[s] = None
                self._ready[s] = 0
                self.evictions += 1
                evicted.append(victim)
            self._slot_of[k] = s
            self._key_of[s] = k
            self._pins[s] = 1  # the store's own pin
            out.append(s)
        if evicted and self.listener is not None:
            self.listener.dropped(evicted)
        return out

    def commit(self, slots: Sequence[int], keys: Sequence[bytes]) -> None:
        """The stores of ``keys`` into ``slots`` completed: make them hits. Admitted tail first so
        that, under pressure, a chain loses its tail before its head."""
        admitted: list[bytes] = []
        for s, key in zip(reversed(slots), reversed(keys)):
            k = self._key_of[s]
            if k is None or k != key or self._ready[s]:
                continue  # discarded (and perhaps reused) meanwhile
            self._ready[s] = 1
            self._pins[s] = 0
            self.policy.admit(k)
            admitted.append(k)
        if admitted and self.listener is not None:
            admitted.reverse()
            self.listener.ready(admitted)

    def discard(self, slots: Sequence[int], keys: Sequence[bytes]) -> None:
        """Forget ``keys`` held in ``slots`` (failed store, failed load): no hit will name them
        again. A slot still pinned by someone else is freed when that pin goes."""
        gone: list[bytes] = []
        for s, key in zip(slots, keys):
            k = self._key_of[s]
            if k is None or k != key:
                continue
            if self._slot_of.get(k) == s:
                del self._slot_of[k]
                gone.append(k)
            if self._ready[s]:
                self.policy.discard(k)
                if self._pins[s] > 0:
                    self._key_of[s] = None
                    self._ready[s] = 0
                    self._doomed.add(s)
                    continue
            self._release(s)
        if gone and self.listener is not None:
            self.listener.dropped(gone)

    def _release(self, s: int) -> None:
        self._key_of[s] = None
        self._ready[s] = 0
        self._pins[s] = 0
        self._free.append(s)
