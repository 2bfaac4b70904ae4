"""KV-cache groups (hybrid models) in the CPU tier: what a prefix hit needs from each group, which
blocks of a group are stored, and the key each group's block is stored under.

The rule follows vLLM 0.32's hybrid allocator (``v1/core/single_type_kv_cache_manager.py``,
``kv_cache_coordinator.py``), because the engine, not this tier, decides which blocks exist:

* **Full attention.** A request's group keeps every block while it runs; a hit of ``n`` blocks is
  usable only when blocks ``0 .. n-1`` are all present.
* **Sliding window of W tokens.** When the engine admits a request with ``T`` computed tokens
  (local hit plus the connector's external tokens), ``add_local_computed_blocks`` and
  ``allocate_external_computed_blocks`` give the first ``max(0, T - W + 1) // block_size`` blocks
  as the null block and allocate real blocks only from there to ``ceil(T / block_size)``
  (``SlidingWindowManager.get_num_skipped_tokens``); while the request runs,
  ``remove_skipped_blocks`` turns every block that leaves the window into the null block. The
  group's own prefix cache matches the same way (``find_longest_cache_hit`` needs only the last
  ``cdiv(W - 1, block_size)`` blocks before the hit end and returns nulls before them). So a
  sliding-window group needs, for a hit ending at block ``n``, exactly the blocks from
  :meth:`GroupRule.first_needed` to ``n``: those are the blocks the engine allocates, and every
  earlier one is null and never read.
* **A hit is one every group can use**: the longest ``n`` such that every full-attention group has
  all its blocks and every sliding-window group has the blocks of its window ending at ``n``
  (vLLM's ``HybridKVCacheCoordinator`` likewise shrinks the hit until every group agrees).
* **Stores follow what vLLM keeps**: at request end a sliding-window group holds only its trailing
  window (the rest are null blocks), so only those blocks are stored; null blocks are skipped.
  A sliding-window hit can therefore end where a stored request ended (or, with
  ``store_mode="fill"``, at any block stored while it was inside the window).
* vLLM's own SimpleCPUOffloadConnector (``v1/simple_kv_offload/manager.py``) does the same: it
  runs the hybrid coordinator's ``find_longest_cache_hit`` over its CPU pool, pins and loads only
  non-null blocks, and skips null blocks when storing. It also recovers window blocks that left
  the window from the engine's prefix cache (still hashed in the free queue); this tier sees block
  ids only and stores what the request holds, so ``store_mode="fill"`` is its way to keep them.
* **Keys cover every group**: block ``i`` of group ``g > 0`` is stored under the prefix key of block
  ``i`` folded with ``g`` (group 0 keeps the plain prefix key, so one-group models are unchanged);
  a block of one group never stands for another's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from kvconnect.errors import UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_window"
KINDS = (FULL, SLIDING)


@dataclass(frozen=True, slots=True)
class GroupRule:
    """How one KV-cache group uses its blocks."""

    kind: str = FULL
    #: Window in tokens (sliding window only).
    window: int = 0

    def first_needed(self, n_blocks: int, block_size: int) -> int:
        """First block of this group the engine allocates (and a hit must fill) when ``n_blocks``
        whole blocks are computed; earlier blocks are null."""
        if self.kind == FULL:
            return 0
        return max(0, n_blocks * block_size - self.window + 1) // block_size

    def first_alive(self, num_computed_tokens: int, block_size: int) -> int:
        """First block the engine still holds once ``num_computed_tokens`` are computed (blocks
        before it may already be null and reused by other requests)."""
        if self.kind == FULL:
            return 0
        return max(0, num_computed_tokens - self.window + 1) // block_size


def rules_of(engine, who: str = "cpu_offload") -> tuple[GroupRule, ...]:
    """One rule per KV-cache group of ``engine`` (:class:`kvconnect.api.EngineInfo`); a
    :class:`UnsupportedModelError` naming the group when this tier cannot serve it."""
    n = max(len(engine.block_sizes), 1)
    if n == 1 and not engine.group_kinds:
        return (GroupRule(),)
    if len(set(engine.block_sizes)) > 1:
        raise UnsupportedModelError(
            f"{who}: KV-cache groups have different block sizes {list(engine.block_sizes)}; this "
            "tier stores one block of one group per slot and needs one block size"
        )
    kinds = engine.group_kinds
    if len(kinds) != n:
        raise UnsupportedModelError(
            f"{who}: the engine has {n} KV-cache groups but names the attention of "
            f"{len(kinds)} (EngineInfo.group_kinds); without it a sliding-window group cannot be "
            "told from a full-attention one"
        )
    windows = tuple(engine.sliding_windows) or (0,) * n
    rules = []
    for g, kind in enumerate(kinds):
        if kind not in KINDS:
            raise UnsupportedModelError(
                f"{who}: KV-cache group {g} uses {kind!r} attention; this tier serves "
                f"{' and '.join(KINDS)} groups only"
            )
        window = int(windows[g]) if g < len(windows) else 0
        if kind == SLIDING and window <= 0:
            raise UnsupportedModelError(
                f"{who}: KV-cache group {g} is sliding-window but its window is {window}"
            )
        rules.append(GroupRule(kind, window if kind == SLIDING else 0))
    return tuple(rules)


def group_key(key: bytes, group: int) -> bytes:
    """The key of block ``i`` of ``group``, from the prefix key of block ``i``."""
    if group == 0:
        return key
    return hashlib.blake2b(key + b"/group/" + group.to_bytes(4, "little"), digest_size=len(key)).digest()


def longest_hit(index, group_keys, rules: Sequence[GroupRule], start: int, limit: int,
                block_size: int) -> tuple[int, list[tuple[int, int, int, bytes]]]:
    """The largest ``n`` in ``(start, limit]`` that every group can use, and the entries a load
    of blocks ``start .. n-1`` copies: ``(group, block index, slot, key)``. ``(start, [])`` when
    none. ``group_keys(g, n)`` gives group ``g``'s keys of blocks ``0 .. n-1``; ``index`` is the
    :class:`~kvconnect.backends.cpu_offload.index.SlotIndex`."""
    n_hi = limit
    full_slots: dict[int, list[int]] = {}
    for g, rule in enumerate(rules):
        if rule.kind == FULL:
            slots = index.ready_prefix(group_keys(g, limit), start, limit)
            full_slots[g] = slots
            n_hi = min(n_hi, start + len(slots))
    for n in range(n_hi, start, -1):
        sliding: dict[int, tuple[int, list[int]]] = {}
        for g, rule in enumerate(rules):
            if rule.kind == FULL:
                continue
            lo = max(start, rule.first_needed(n, block_size))
            slots = index.ready_prefix(group_keys(g, n), lo, n)
            if len(slots) < n - lo:
                break
            sliding[g] = (lo, slots)
        else:
            out: list[tuple[int, int, int, bytes]] = []
            for g in range(len(rules)):
                keys = group_keys(g, n)
                if g in full_slots:
                    lo, slots = start, full_slots[g][: n - start]
                else:
                    lo, slots = sliding[g]
                out.extend((g, lo + j, s, keys[lo + j]) for j, s in enumerate(slots))
            return n, out
    return start, []
