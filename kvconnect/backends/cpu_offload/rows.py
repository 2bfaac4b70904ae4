"""Seeing a layer's KV tensor and its host pool as tables of equal rows, so that copying any set
of blocks is one gather or scatter of whole rows per layer.

A host pool is ``[num_slots, *block_shape]`` (the engine tensor's shape without its block
dimension, same dimension order and dtype), contiguous. The engine tensor may have its block
dimension anywhere (``("kv", "block", ...)`` on flash attention) and any strides.

The innermost dimensions after which nothing but the block dimension (or a non-contiguous stride)
comes form a *chunk*: contiguous in both tensors. The remaining non-block dimensions are *planes*
(K and V, for instance). Viewed as ``[rows, chunk]``:

* pool slot ``s`` is rows ``s * planes ... s * planes + planes - 1``;
* engine block ``b`` is rows ``b * block_step + plane_rows`` (same plane order as the pool).

When the engine's strides do not divide into whole chunks (odd padding), :func:`plan_rows`
returns None and the copier falls back to per-dimension indexing, which is always correct but
makes one extra pass.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from kvconnect.layout import KVLayout


@dataclass(frozen=True, slots=True)
class RowPlan:
    chunk: int  # elements per row
    planes: int
    block_step: int  # engine rows between consecutive blocks
    plane_rows: np.ndarray  # [planes] engine row offsets of one block's planes, pool order
    engine_rows_total: int

    def engine_rows(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Engine rows of ``block_ids`` in pool order: block-major, then plane."""
        if self.planes == 1 and self.plane_rows[0] == 0:
            return block_ids * self.block_step if self.block_step != 1 else block_ids
        pr = torch.from_numpy(self.plane_rows)
        return (block_ids[:, None] * self.block_step + pr[None, :]).reshape(-1)


def block_shape(layout: KVLayout) -> tuple[int, ...]:
    bd = layout.dims.index("block")
    return layout.shape[:bd] + layout.shape[bd + 1 :]


def plan_rows(layout: KVLayout) -> RowPlan | None:
    bd = layout.dims.index("block")
    others = [i for i in range(len(layout.dims)) if i != bd]
    # Walk from the innermost non-block dim outwards while the memory stays contiguous.
    chunk = 1
    inner: list[int] = []
    for i in reversed(others):
        if layout.shape[i] == 1 or layout.strides[i] == chunk:
            chunk *= layout.shape[i]
            inner.append(i)
        else:
            break
        if i - 1 == bd:
            break  # the next dim outwards is the block dim: a chunk never spans blocks
    outer = [i for i in others if i not in inner]
    bstride = layout.strides[bd]
    if bstride % chunk or any(layout.strides[i] % chunk for i in outer):
        return None
    offs = [
        sum(ix * layout.strides[d] for ix, d in zip(combo, outer))
        for combo in itertools.product(*(range(layout.shape[d]) for d in outer))
    ]
    plane_rows = np.asarray([o // chunk for o in offs] or [0], dtype=np.int64)
    step = bstride // chunk
    total = (layout.num_blocks - 1) * step + int(plane_rows.max()) + 1
    if total * chunk * layout.itemsize > layout.span_bytes:
        return None  # rows would reach past the tensor (overlapping / exotic strides)
    assert len(plane_rows) * chunk == math.prod(block_shape(layout))
    return RowPlan(chunk, len(plane_rows), step, plane_rows, total)


def engine_row_view(t: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    return t.as_strided((plan.engine_rows_total, plan.chunk), (plan.chunk, 1))


def pool_row_view(pool: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    return pool.view(-1, plan.chunk)
