"""Seeing engine KV memory and the host pool as tables of equal rows, so that copying any set of
blocks is one gather or scatter of whole rows per piece of memory.

The engine hands kvconnect *entries*: tensor views with a :class:`~kvconnect.layout.KVLayout`
each. Several entries may view the same memory: vLLM's CPU worker keeps one layer as
``[blocks, heads, block_size, 2*head_dim]`` and kvconnect describes it as two strided entries
(``.k``, feature-major, and ``.v``), yet one block of that layer is one contiguous run. So rows
are planned over *memory*, not over entries: the byte ranges of one block of every entry that
shares a storage (within one KV-cache group, whose entries share block ids) are united and
merged where contiguous, whatever the entries' dimension names. A :class:`SpanPlan` then sees the
storage as ``[rows, chunk]`` bytes:

* engine block ``b`` is rows ``b * block_step + block_rows`` (``block_rows`` in memory order);
* pool slot ``s`` is rows ``s * rows_per_block ...`` (the engine's block bytes, in the engine's
  memory order, padding left out).

Contiguous block memory (vLLM CPU, MLA, SGLang-style page-first buffers, layer-interleaved
caches) is thus one row per block; flash-attention NHD/HND is two (K plane, V plane). Merging is
kept only where it does not split rows (fewer rows than planning the entries one by one).
Entries whose strides do not divide into rows get no plan (:func:`plan_spans` returns them
apart) and are copied by indexing their block dimension: always correct, one extra pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvconnect.layout import KVLayout


@dataclass(frozen=True, slots=True)
class SpanPlan:
    """Rows of one piece of engine memory that one or more entries of one KV-cache group view."""

    names: tuple[str, ...]  # the entries it covers
    group: int
    num_blocks: int
    #: Byte offset of row 0 from the start of the storage.
    base: int
    chunk: int  # bytes per row
    block_step: int  # rows between consecutive blocks
    block_rows: np.ndarray  # [rows_per_block] rows of block 0 relative to row 0, memory order
    rows_total: int

    @property
    def rows_per_block(self) -> int:
        return len(self.block_rows)

    @property
    def block_bytes(self) -> int:
        return self.rows_per_block * self.chunk

    @property
    def key(self) -> tuple:
        """Plans with equal keys map block ids to the same rows."""
        return (self.group, self.block_step, tuple(self.block_rows.tolist()))

    def engine_rows(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Engine rows of ``block_ids`` in pool order: block-major, then memory order."""
        if self.rows_per_block == 1 and self.block_rows[0] == 0:
            return block_ids * self.block_step if self.block_step != 1 else block_ids
        br = torch.from_numpy(self.block_rows)
        return (block_ids[:, None] * self.block_step + br[None, :]).reshape(-1)


@dataclass(frozen=True, slots=True)
class Entry:
    """One registered view: its name, storage identity, byte offset in that storage and layout."""

    name: str
    storage: int  # the storage's data pointer: entries with equal values share memory
    offset: int  # bytes from the storage's start to the view's first element
    storage_bytes: int
    layout: KVLayout

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, layout: KVLayout) -> Entry:
        st = tensor.untyped_storage()
        return cls(name, int(st.data_ptr()), int(tensor.storage_offset()) * tensor.element_size(),
                   int(st.nbytes()), layout)


def block_segments(layout: KVLayout) -> np.ndarray:
    """``[n, 2]`` ``(offset, nbytes)`` of block 0 relative to the view's first element, merged."""
    return np.asarray(layout.block_ranges(0), dtype=np.int64).reshape(-1, 2)


def _union(segs: np.ndarray) -> np.ndarray:
    """Sort and merge overlapping or touching ``(offset, nbytes)`` segments."""
    segs = segs[np.argsort(segs[:, 0], kind="stable")]
    out: list[list[int]] = []
    for o, n in segs.tolist():
        if out and o <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], o + n - out[-1][0])
        else:
            out.append([o, n])
    return np.asarray(out, dtype=np.int64)


def plan_memory(entries: Sequence[Entry]) -> SpanPlan | None:
    """One plan for entries that share a storage, a group, a block count and a block stride; None
    when their united block bytes do not split into equal rows that stay inside the storage."""
    lay0 = entries[0].layout
    bstride = lay0.stride_bytes("block")
    segs = _union(np.concatenate([block_segments(e.layout) + [e.offset, 0] for e in entries]))
    chunk = math.gcd(*segs[:, 1].tolist())
    base = int(segs[0, 0])
    rel = segs[:, 0] - base
    if chunk <= 0 or bstride % chunk or np.any(rel % chunk):
        return None
    block_rows = np.concatenate([np.arange(n // chunk, dtype=np.int64) + o // chunk
                                 for o, n in zip(rel.tolist(), segs[:, 1].tolist())])
    step = bstride // chunk
    total = (lay0.num_blocks - 1) * step + int(block_rows.max()) + 1
    if base + total * chunk > entries[0].storage_bytes:
        return None  # rows would reach past the storage (exotic strides)
    if len(entries) > 1 and not _blocks_disjoint(block_rows, step, lay0.num_blocks):
        return None  # the entries' blocks overlap each other: copy them one by one
    return SpanPlan(tuple(e.name for e in entries), lay0.group, lay0.num_blocks, base, chunk, step,
                    block_rows, total)


def _blocks_disjoint(block_rows: np.ndarray, step: int, num_blocks: int) -> bool:
    """No row belongs to two blocks (true of any single engine tensor; checked for unions)."""
    if int(block_rows.max()) - int(block_rows.min()) < step:
        return True
    rows = (np.arange(num_blocks, dtype=np.int64)[:, None] * step + block_rows[None, :]).reshape(-1)
    return np.unique(rows).size == rows.size


def plan_spans(entries: Sequence[Entry]) -> tuple[list[SpanPlan], list[Entry]]:
    """Row plans covering ``entries``: those of one storage, KV-cache group, block count and
    block stride are merged into one plan when that makes no more rows than planning them one by
    one. Returns the plans and the entries left without one (copied by block indexing)."""
    sets: dict[tuple, list[Entry]] = {}
    for e in entries:
        lay = e.layout
        sets.setdefault((e.storage, lay.group, lay.num_blocks, lay.stride_bytes("block")), []).append(e)
    plans: list[SpanPlan] = []
    left: list[Entry] = []
    for members in sets.values():
        alone = [(e, plan_memory([e])) for e in members]
        merged = plan_memory(members) if len(members) > 1 else None
        if merged is not None and all(p is not None for _, p in alone) and (
            merged.rows_per_block <= sum(p.rows_per_block for _, p in alone if p is not None)
        ):
            plans.append(merged)
            continue
        for e, p in alone:
            if p is None:
                left.append(e)
            else:
                plans.append(p)
    return plans, left


def row_itemsize(plan: SpanPlan, storage_ptr: int) -> int:
    """Widest element (8, 4, 2 or 1 bytes) that rows can be viewed in: a gather kernel moves
    wide elements faster; numpy copies whole rows either way."""
    for w in (8, 4, 2):
        if plan.chunk % w == 0 and (storage_ptr + plan.base) % w == 0:
            return w
    return 1


_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def engine_row_view(tensor: torch.Tensor, plan: SpanPlan) -> torch.Tensor:
    """``[rows_total, chunk / w]`` view of the storage behind ``tensor`` (w: :func:`row_itemsize`)."""
    st = tensor.untyped_storage()
    w = row_itemsize(plan, int(st.data_ptr()))
    out = torch.empty(0, dtype=_DTYPES[w], device=tensor.device)
    return out.set_(st, plan.base // w, (plan.rows_total, plan.chunk // w), (plan.chunk // w, 1))


def pool_row_view(pool: torch.Tensor, plan: SpanPlan, itemsize: int) -> torch.Tensor:
    """``[num_slots * rows_per_block, chunk / itemsize]`` view of a ``[num_slots, block_bytes]``
    byte pool."""
    return pool.view(_DTYPES[itemsize]).view(-1, plan.chunk // itemsize)


def block_shape(layout: KVLayout) -> tuple[int, ...]:
    """An entry's shape without its block dimension (the pool shape of an entry without a plan)."""
    bd = layout.dims.index("block")
    return layout.shape[:bd] + layout.shape[bd + 1 :]
