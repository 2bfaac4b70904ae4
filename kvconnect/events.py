"""KV cache events of kvconnect's storage tiers, in engine-neutral terms.

Cache-aware routers learn what an instance holds from the engine's KV cache events (vLLM:
``BlockStored`` / ``BlockRemoved`` with a ``medium``). A storage tier knows its blocks by private
keys (salted, folded with the tier's identity); a router knows them by the *engine's* block hashes.
:class:`TierEvents` is the small hook a storage backend owns to bridge the two: it remembers the
engine hash of every block the tier holds and turns the tier's index transitions into events.

A backend calls, on its scheduler half (where the index lives, so one copy of each event is
published however many workers there are):

``planned(request, block_indices, keys, group=0)``
    a store of these blocks of ``request`` (of KV-cache ``group``, at the tier's block size, which
    must be the one ``request.block_hashes`` are computed at) was planned under these keys;
    nothing is published yet;
``ready(keys)``
    these keys became hits (their stores completed), in chain order -> :class:`BlocksStored`;
``dropped(keys)``
    these keys left the tier (evicted, dropped after a failed store or load) -> :class:`BlocksRemoved`
    for those that had been published; a planned store that never completed publishes nothing;
``cleared()``
    the tier was emptied -> :class:`BlocksRemoved` of everything it published (the engine's
    "all blocks cleared" event names no medium, so a router would drop the device's blocks too).

The engine adapter takes the events (:meth:`take`) and builds the engine's own event types.
Only requests that carry the engine's block hashes (``RequestView.block_hashes``; vLLM sets them)
produce events: without them no subscriber could join a tier's blocks to the device's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvconnect.api import RequestView

logger = logging.getLogger(__name__)

#: Medium names, as vLLM spells them in its KV cache events (``vllm.v1.kv_offload.base.Medium``).
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"
#: Locality of a tier's storage relative to the publishing instance, as vLLM spells it
#: (``vllm.v1.kv_offload.base.Locality``); None: unspecified.
LOCALITY_LOCAL = "LOCAL"
LOCALITY_REMOTE = "REMOTE"


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """A run of consecutive blocks of one request that landed in the tier."""

    medium: str
    #: The engine's block hashes, in chain order.
    block_hashes: tuple[Any, ...]
    #: The engine's hash of the block before the first one (None: the run starts the prefix).
    parent_block_hash: Any | None
    #: Token ids of every block of the run, concatenated.
    token_ids: tuple[int, ...]
    block_size: int
    #: The request the blocks came from (the engine adapter reads engine-specific extras from
    #: it: LoRA, extra hash keys), and the index of the run's first block in it.
    request: RequestView | None = None
    first_block: int = 0
    #: KV-cache group of the blocks.
    group: int = 0
    #: Where the tier's storage is relative to the instance (``LOCALITY_*``), and which tier it
    #: is when one medium has several (vLLM's ``ownership``: a secondary tier's name).
    locality: str | None = None
    ownership: str | None = None


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """Blocks that left the tier (by the engine's block hashes)."""

    medium: str
    block_hashes: tuple[Any, ...]
    group: int = 0
    locality: str | None = None
    ownership: str | None = None


TierEvent = BlocksStored | BlocksRemoved


@dataclass(slots=True)
class _Planned:
    hash: Any
    parent: Any | None
    tokens: tuple[int, ...]
    request: RequestView
    index: int
    group: int


class TierEvents:
    """Engine hashes of what one tier holds, and the events not yet taken. O(blocks named) per call."""

    def __init__(self, medium: str, block_size: int, locality: str | None = None,
                 ownership: str | None = None) -> None:
        self.medium = medium
        self.block_size = block_size
        self.locality = locality
        self.ownership = ownership
        self._planned: dict[bytes, _Planned] = {}
        #: key -> (engine hash, group) of every block published as stored and not yet removed.
        self._held: dict[bytes, tuple[Any, int]] = {}
        self._out: list[TierEvent] = []

    def holds(self, key: bytes) -> bool:
        """Whether ``key`` was published as stored and not since removed."""
        return key in self._held

    def planned(self, request: RequestView, block_indices: Sequence[int], keys: Sequence[bytes],
                group: int = 0) -> None:
        hashes = request.block_hashes
        if hashes is None:
            return
        toks = request.all_token_ids if request.all_token_ids is not None else request.prompt_token_ids
        bs = self.block_size
        for i, k in zip(block_indices, keys):
            if i >= len(hashes) or (i + 1) * bs > len(toks):
                continue  # no engine hash for it (yet): nothing a subscriber could join
            self._planned[k] = _Planned(hashes[i], hashes[i - 1] if i > 0 else None,
                                        tuple(toks[i * bs : (i + 1) * bs]), request, i, group)

    def ready(self, keys: Sequence[bytes]) -> None:
        run: list[_Planned] = []
        for k in keys:
            p = self._planned.pop(k, None)
            if p is None:
                self._flush(run)
                run = []
                continue
            self._held[k] = (p.hash, p.group)
            last = run[-1] if run else None
            if last is not None and (p.request is not last.request or p.index != last.index + 1
                                     or p.group != last.group):
                self._flush(run)
                run = []
            run.append(p)
        self._flush(run)

    def _flush(self, run: list[_Planned]) -> None:
        if not run:
            return
        first = run[0]
        self._out.append(BlocksStored(
            medium=self.medium, block_hashes=tuple(p.hash for p in run), parent_block_hash=first.parent,
            token_ids=tuple(t for p in run for t in p.tokens), block_size=self.block_size,
            request=first.request, first_block=first.index, group=first.group,
            locality=self.locality, ownership=self.ownership,
        ))

    def dropped(self, keys: Sequence[bytes]) -> None:
        gone: list[tuple[Any, int]] = []
        for k in keys:
            self._planned.pop(k, None)
            h = self._held.pop(k, None)
            if h is not None:
                gone.append(h)
        self._removed(gone)

    def cleared(self) -> None:
        gone = list(self._held.values())
        self._held.clear()
        self._planned.clear()
        self._removed(gone)

    def _removed(self, gone: list[tuple[Any, int]]) -> None:
        by_group: dict[int, list[Any]] = {}
        for h, g in gone:
            by_group.setdefault(g, []).append(h)
        for g, hashes in by_group.items():
            self._out.append(BlocksRemoved(self.medium, tuple(hashes), g, self.locality, self.ownership))

    def take(self) -> list[TierEvent]:
        out, self._out = self._out, []
        return out
