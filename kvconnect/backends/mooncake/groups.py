"""KV-cache groups (hybrid models: sliding-window and full attention) in the shared tier.

What a hit needs from each group, which blocks of a group are stored and the key each group's
block is stored under are the host tier's rules (:mod:`kvconnect.backends.cpu_offload.groups`,
which explains them from vLLM's hybrid allocator); this module applies them to objects in the
store instead of slots in host memory:

* **Lookup**: one batched existence query covers every group's object of every block after the
  engine's own prefix, on every TP rank; an object counts as present when every rank has it, and
  the hit is the longest prefix every group can use (:func:`longest_hit`).
* **Load and store**: one object per (group, block): block ``i`` of group ``g`` is stored under
  the group key of the prefix key of block ``i``; a sliding-window group loads and stores only
  the blocks of its window; null blocks are never loaded or stored.
* **Worker**: vLLM's hybrid allocator gives every group the same number of layers with the same
  block shape, so an object of any group has the same size. :class:`GroupedBlocks` numbers block
  ``b`` of group ``g`` as ``g * num_blocks + b`` for the worker's I/O, which then needs to know
  nothing about groups.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvconnect.backends.cpu_offload import groups as G
from kvconnect.backends.mooncake.objects import BlockObjects
from kvconnect.errors import UnsupportedModelError


class _Present:
    """The store's answer to one existence query, read as the host tier's index reads its slots
    (:meth:`~kvconnect.backends.cpu_offload.index.SlotIndex.ready_prefix`)."""

    def __init__(self, present: set[bytes]) -> None:
        self.present = present

    def ready_prefix(self, keys: Sequence[bytes], start: int, stop: int) -> list[bytes]:
        out: list[bytes] = []
        for k in keys[start:stop]:
            if k not in self.present:
                break
            out.append(k)
        return out


def longest_hit(rules: Sequence[G.GroupRule], gkeys: Sequence[Sequence[bytes]], present: set[bytes],
                start: int, limit: int, block_size: int) -> int:
    """Blocks from ``start`` on that every group can load (0: none). ``gkeys[g]``: group ``g``'s
    keys of blocks ``0 .. limit-1``; ``present``: the keys whose objects exist on every rank."""
    end, _ = G.longest_hit(_Present(present), lambda g, n: gkeys[g], rules, start, limit, block_size)
    return end - start


def load_entries(rules: Sequence[G.GroupRule], gkeys: Sequence[Sequence[bytes]], present: set[bytes],
                 blocks: Sequence[Sequence[int]], start: int, end: int, block_size: int,
                 null: int | None) -> tuple[list[int], list[bytes], list[int]] | None:
    """Engine block ids, keys and groups a load of blocks ``start .. end-1`` fills; None when an
    object it needs was not found or the engine allocated fewer blocks."""
    if any(len(b) < end for b in blocks):
        return None
    ids: list[int] = []
    keys: list[bytes] = []
    grp: list[int] = []
    for g, rule in enumerate(rules):
        for i in range(max(start, rule.first_needed(end, block_size)), end):
            b = blocks[g][i]
            if b == null:
                continue  # the engine keeps nothing there
            k = gkeys[g][i]
            if k not in present:
                return None
            ids.append(b)
            keys.append(k)
            grp.append(g)
    return ids, keys, grp


def save_entries(rules: Sequence[G.GroupRule], group_keys, blocks: Sequence[Sequence[int]], n_full: int,
                 skip: tuple[int, int], computed: int, block_size: int,
                 null: int | None) -> list[tuple[int, int, int, bytes]]:
    """``(group, block index, block id, key)`` of every block a finished request stores: its full
    blocks below ``n_full`` that the engine still holds (a sliding-window group keeps its window at
    ``computed`` tokens), outside ``skip`` (just loaded from the store) and not null.
    ``group_keys(g, n)`` gives group ``g``'s keys of blocks ``0 .. n-1``."""
    lo_skip, hi_skip = skip
    out: list[tuple[int, int, int, bytes]] = []
    for g, rule in enumerate(rules):
        keys = group_keys(g, n_full)
        for i in range(rule.first_alive(computed, block_size), min(n_full, len(keys), len(blocks[g]))):
            b = blocks[g][i]
            if b != null and not lo_skip <= i < hi_skip:
                out.append((g, i, b, keys[i]))
    return out


class GroupedBlocks:
    """Block runs of every KV-cache group of one rank, numbered ``g * num_blocks + b`` (the same
    interface as :class:`~kvconnect.backends.mooncake.objects.BlockObjects`)."""

    def __init__(self, groups: Sequence[BlockObjects]) -> None:
        sizes = {bo.payload_bytes for bo in groups}
        if len(sizes) > 1:
            raise UnsupportedModelError(
                f"mooncake: KV-cache groups have blocks of {sorted(sizes)} bytes; one object holds "
                "one block of one group, so every group needs the same layers and block shape"
            )
        self.groups = list(groups)
        self.blocks_per_group = min(bo.num_blocks for bo in groups)
        self.num_blocks = self.blocks_per_group * len(groups)
        self.payload_bytes = sizes.pop()

    def runs(self, block: int) -> tuple[list[int], list[int]]:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block id {block} outside [0, {self.num_blocks})")
        g, b = divmod(block, self.blocks_per_group)
        return self.groups[g].runs(b)

    def number(self, block: int, group: int) -> int:
        """The I/O's number of engine block ``block`` of ``group``."""
        return group * self.blocks_per_group + block

    def engine_block(self, number: int) -> int:
        return number % self.blocks_per_group
