"""Per-request state of the CPU tier's scheduler half, and the pure calculations on it: a request's
block lists per group, the tokens whose KV can exist, and which pinned entries a load takes. No
index, no I/O: :mod:`kvconnect.backends.cpu_offload.scheduler` drives them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvconnect.api import BlockIds, RequestView
from kvconnect.backends.cpu_offload import groups as G
from kvconnect.errors import LayoutError


@dataclass(slots=True)
class Lookup:
    """A pinned prefix hit of one request, from its latest lookup until the allocation notice."""

    num_computed: int
    start: int
    #: Block index after the hit's last block.
    end: int
    #: Pinned slot and key of every block the hit loads.
    slots: list[int]
    keys: list[bytes]
    #: (group, block index) of each slot; None: group 0, blocks ``start, start + 1, ...``.
    where: list[tuple[int, int]] | None = None


@dataclass(slots=True)
class ReqState:
    """What the scheduler half tracks of one request, from its allocation until its stores end."""

    view: RequestView
    #: The request's block ids, per KV-cache group.
    blocks: list[list[int]]
    #: Leading blocks already planned (stored, being stored, loaded from here, or skipped), per group.
    planned: list[int]
    #: Tokens whose KV is computed once the latest scheduled step ran.
    computed: int = 0
    #: Slots/keys of the load in flight (None: no load in flight).
    load_slots: list[int] | None = None
    load_keys: list[bytes] = field(default_factory=list)
    load_tokens: int = 0
    #: Pending slots/keys of every store planned for the request, in chain order.
    store_slots: list[int] = field(default_factory=list)
    store_keys: list[bytes] = field(default_factory=list)
    finished: bool = False


def per_group(block_ids: BlockIds, n_groups: int, what: str, who: str = "cpu_offload") -> list[list[int]]:
    """The engine's block ids as one list per group; an empty ``block_ids`` gives empty lists."""
    if n_groups == 1 and len(block_ids) == 1:
        return [list(block_ids[0])]
    if not len(block_ids):
        return [[] for _ in range(n_groups)]
    if len(block_ids) != n_groups:
        raise LayoutError(
            f"{who}: {what} has {len(block_ids)} KV-cache groups; the engine announced {n_groups}"
        )
    return [list(ids) for ids in block_ids]


def known_kv_tokens(view: RequestView) -> int:
    """Tokens whose KV can exist: the final sampled token is never fed back, so once there are
    outputs the last token has no KV."""
    n = len(view.all_token_ids) if view.all_token_ids is not None else len(view.prompt_token_ids)
    return n - 1 if n > len(view.prompt_token_ids) else n


def load_entries(lk: Lookup, end: int, blocks: list[list[int]], rules: Sequence[G.GroupRule], block_size: int,
                 null_block: int | None) -> tuple[list[int], list[int], list[int]] | None:
    """What a load ending at block ``end`` copies: the indices into the lookup's pins, the
    engine block of each and their groups (empty for one group); None when the pins do not
    cover what the engine allocated (it took more tokens than offered, or fewer and a sliding
    window then reaches blocks that were not pinned)."""
    if end > lk.end or end <= lk.start or any(len(b) < end for b in blocks):
        return None
    if lk.where is None:
        return list(range(end - lk.start)), blocks[0][lk.start : end], []
    have = {w: j for j, w in enumerate(lk.where)}
    js: list[int] = []
    ids: list[int] = []
    groups: list[int] = []
    for g, rule in enumerate(rules):
        for i in range(max(lk.start, rule.first_needed(end, block_size)), end):
            b = blocks[g][i]
            if b == null_block:
                continue  # the engine keeps nothing there
            j = have.get((g, i))
            if j is None:
                return None
            js.append(j)
            ids.append(b)
            groups.append(g)
    return js, ids, groups
