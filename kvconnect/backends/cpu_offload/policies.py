"""Eviction policies for the host tier.

A policy orders the *evictable* entries (stored, complete, not pinned) by key. The index tells it
what happens to an entry; the policy only decides who goes first:

``admit(key)``    a store completed: the entry became evictable for the first time
``touch(key)``    the entry was hit (it may be detached at the time)
``detach(key)``   the entry was pinned: never offer it until ``attach``
``attach(key)``   the last pin was released
``discard(key)``  the entry is gone for another reason (failed load, aborted store)
``evict()``       choose a victim among attached entries and forget it; None when there is none

Every operation is O(1).
"""

from __future__ import annotations

import abc
from collections import OrderedDict

from kvconnect.errors import ConfigError


class EvictionPolicy(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def admit(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def touch(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def detach(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def attach(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def discard(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def evict(self) -> bytes | None: ...

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of evictable (attached) entries."""


class LRUPolicy(EvictionPolicy):
    """Least recently used first; pinning counts as a use."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def admit(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def detach(self, key: bytes) -> None:
        self._order.pop(key, None)

    def attach(self, key: bytes) -> None:
        self._order[key] = None

    def discard(self, key: bytes) -> None:
        self._order.pop(key, None)

    def evict(self) -> bytes | None:
        if not self._order:
            return None
        key, _ = self._order.popitem(last=False)
        return key

    def __len__(self) -> int:
        return len(self._order)


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha): ``T1`` holds entries seen once, ``T2``
    entries hit again; ghost lists ``B1``/``B2`` remember recent victims of each and move the
    target size ``p`` of ``T1`` towards whichever list would have kept the entry."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self.c = max(1, capacity)
        self.p = 0.0
        self._t1: OrderedDict[bytes, None] = OrderedDict()
        self._t2: OrderedDict[bytes, None] = OrderedDict()
        self._b1: OrderedDict[bytes, None] = OrderedDict()
        self._b2: OrderedDict[bytes, None] = OrderedDict()
        #: Resident keys (attached or not) -> 1 or 2 (which list they belong to).
        self._where: dict[bytes, int] = {}

    def _list(self, key: bytes) -> OrderedDict[bytes, None]:
        return self._t2 if self._where[key] == 2 else self._t1

    def admit(self, key: bytes) -> None:
        if key in self._b1:  # a recent T1 victim came back: T1 should be larger
            self.p = min(self.c, self.p + max(1.0, len(self._b2) / max(1, len(self._b1))))
            del self._b1[key]
            self._where[key] = 2
        elif key in self._b2:  # a recent T2 victim came back: T2 should be larger
            self.p = max(0.0, self.p - max(1.0, len(self._b1) / max(1, len(self._b2))))
            del self._b2[key]
            self._where[key] = 2
        else:
            self._where[key] = 1
        self._list(key)[key] = None

    def touch(self, key: bytes) -> None:
        where = self._where.get(key)
        if where is None:
            return
        attached = key in self._t1 or key in self._t2
        self._t1.pop(key, None)
        self._t2.pop(key, None)
        self._where[key] = 2
        if attached:
            self._t2[key] = None

    def detach(self, key: bytes) -> None:
        if key in self._where:
            self._list(key).pop(key, None)

    def attach(self, key: bytes) -> None:
        if key in self._where:
            lst = self._list(key)
            lst[key] = None
            lst.move_to_end(key)

    def discard(self, key: bytes) -> None:
        if self._where.pop(key, None) is not None:
            self._t1.pop(key, None)
            self._t2.pop(key, None)

    def evict(self) -> bytes | None:
        if self._t1 and (len(self._t1) > self.p or not self._t2):
            key, _ = self._t1.popitem(last=False)
            ghosts = self._b1
        elif self._t2:
            key, _ = self._t2.popitem(last=False)
            ghosts = self._b2
        else:
            return None
        del self._where[key]
        ghosts[key] = None
        while len(self._b1) + len(self._b2) > self.c:
            (self._b1 if len(self._b1) >= len(self._b2) else self._b2).popitem(last=False)
        return key

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "arc": ARCPolicy}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    try:
        cls = POLICIES[name]
    except KeyError as e:
        raise ConfigError(
            f"cpu_offload.eviction_policy: unknown policy {name!r}; known: {sorted(POLICIES)}"
        ) from e
    return cls(capacity)
