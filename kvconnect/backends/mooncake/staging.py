"""A registered host staging buffer for KV caches the store cannot reach zero-copy (GPU memory,
or any cache when ``staging="always"``).

The buffer holds ``slots`` objects. Each layer has its own region, ``[slots, layer bytes]``, so
one layer's share of a batch of blocks moves as one contiguous copy; an object is its layers'
regions at one slot, split at the same run boundaries as the zero-copy path (:func:`objects._runs`),
so a staged object is byte for byte, checksum included, the object a zero-copy instance stores:
the two share a store.

* :meth:`Staging.gather` (store): the blocks' bytes, in object order, into slots. On a GPU a
  gather kernel per layer on the staging stream, which first waits for the engine's stream as it
  was when the store was submitted (so the forward pass's writes are in), then one DMA per layer
  into the pinned buffer; the call returns when the bytes are on the host. Gathers and scatters
  run on two streams of their own, never the engine's.
* :meth:`Staging.scatter` (load): slots into the blocks, called only for objects already verified;
  returns when the bytes are in the engine's memory.

On the CPU a gather is one ``index_select`` per layer and a scatter one slice copy per run of
consecutive blocks and layer (memcpy, GIL released).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvconnect.backends.mooncake.objects import _runs, run_split
from kvconnect.errors import LayoutError
from kvconnect.layout import KVLayout


def _block_bytes_view(t: torch.Tensor, lay: KVLayout) -> torch.Tensor:
    """A uint8 view of ``t``'s memory, ``[num_blocks, *outer dims, run bytes]``, whose every block
    reads in memory order (the order of the zero-copy path's runs)."""
    run, outer = run_split(lay)
    outer = sorted(outer, key=lambda i: -lay.strides[i])
    item = lay.itemsize
    bd = lay.dims.index("block")
    sizes = [lay.shape[bd], *(lay.shape[i] for i in outer), run]
    strides = [lay.strides[bd] * item, *(lay.strides[i] * item for i in outer), 1]
    # Offsets of one block's runs in this view's order must rise (no interleaving dims).
    offs = np.zeros(1, np.int64)
    for i in outer:
        offs = (offs[:, None] + np.arange(lay.shape[i]) * lay.strides[i] * item).reshape(-1)
    if np.any(np.diff(offs) < run):
        raise LayoutError(f"mooncake: staging cannot read KV layout {lay.dims} (strides "
                          f"{lay.strides}) in memory order")
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    return raw.as_strided(sizes, strides, t.storage_offset() * item)


def _consecutive(block_ids: Sequence[int], slot: int) -> list[tuple[int, int, int]]:
    """``(first block, first slot, count)`` of each run of consecutive block ids."""
    out: list[tuple[int, int, int]] = []
    for j, b in enumerate(block_ids):
        if out and out[-1][0] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((b, slot + j, 1))
    return out


class Staging:
    """Host staging for one rank's KV caches (every layer on one device)."""

    def __init__(self, caches: Sequence[tuple[torch.Tensor, KVLayout]], slots: int) -> None:
        if not caches:
            raise LayoutError("mooncake: no KV layers")
        if slots < 1:
            raise ValueError("staging needs at least one slot")
        self.device = caches[0][0].device
        if any(t.device != self.device for t, _ in caches):
            raise LayoutError("mooncake: KV layers on several devices: "
                              f"{sorted({str(t.device) for t, _ in caches})}")
        self.cuda = self.device.type == "cuda"
        self.slots = slots
        self.views = [_block_bytes_view(t, lay) for t, lay in caches]
        self.run_sizes = [[n for _, n in _runs(lay)] for _, lay in caches]
        self.layer_bytes = [sum(r) for r in self.run_sizes]
        self.payload_bytes = sum(self.layer_bytes)
        self.num_blocks = min(lay.num_blocks for _, lay in caches)
        self.buffer = torch.empty(slots * self.payload_bytes, dtype=torch.uint8,
                                  pin_memory=self.cuda)
        self.regions: list[torch.Tensor] = []
        off = 0
        for v, lb in zip(self.views, self.layer_bytes):
            region = self.buffer[off : off + slots * lb].view(slots, *v.shape[1:])
            self.regions.append(region)
            off += slots * lb
        self._bases = [r.data_ptr() for r in self.regions]
        # One stream per direction: a store's gather never waits behind a load's scatter.
        self._streams = ({k: torch.cuda.Stream(device=self.device) for k in ("gather", "scatter")}
                         if self.cuda else {})

    @property
    def ptr(self) -> int:
        return self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def runs(self, slot: int) -> tuple[list[int], list[int]]:
        """Addresses and sizes of the object staged at ``slot``, split like the zero-copy runs."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"staging slot {slot} outside [0, {self.slots})")
        ptrs, sizes = [], []
        for base, lb, rs in zip(self._bases, self.layer_bytes, self.run_sizes):
            p = base + slot * lb
            for n in rs:
                ptrs.append(p)
                sizes.append(n)
                p += n
        return ptrs, sizes

    def marker(self) -> Any:
        """On a GPU, an event on the engine's current stream: a gather submitted with it reads
        what the engine had written when this was called. None on the CPU."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(block_ids), dtype=torch.long, device=self.device)

    def _span(self, block_ids: Sequence[int], slot: int) -> int:
        """How many slots from ``slot`` the blocks take; IndexError past the buffer's end."""
        n = len(block_ids)
        if slot + n > self.slots:
            raise IndexError(f"{n} objects from slot {slot} exceed {self.slots} slots")
        return n

    def gather(self, block_ids: Sequence[int], slot: int, after: Any = None) -> None:
        """Blocks ``block_ids`` into slots ``slot, slot + 1, ...``; returns when they are on the host."""
        n = self._span(block_ids, slot)
        if not n:
            return
        if not self.cuda:
            ids = self._ids(block_ids)
            for v, r in zip(self.views, self.regions):
                torch.index_select(v, 0, ids, out=r[slot : slot + n])
            return
        stream = self._streams["gather"]
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            ids = self._ids(block_ids)
            for v, r in zip(self.views, self.regions):
                r[slot : slot + n].copy_(v.index_select(0, ids), non_blocking=True)
        stream.synchronize()

    def scatter(self, block_ids: Sequence[int], slot: int, after: Any = None) -> None:
        """Slots ``slot, slot + 1, ...`` into blocks ``block_ids``; returns when they are written."""
        n = self._span(block_ids, slot)
        if not n:
            return
        if not self.cuda:
            # A slice copy (memcpy) per run of consecutive blocks: index_copy_ ran at 2 GB/s here.
            for b0, s0, k in _consecutive(block_ids, slot):
                for v, r in zip(self.views, self.regions):
                    v[b0 : b0 + k].copy_(r[s0 : s0 + k])
            return
        stream = self._streams["scatter"]
        with torch.cuda.stream(stream):
            if after is not None:
                stream.wait_event(after)
            ids = self._ids(block_ids)
            for v, r in zip(self.views, self.regions):
                v.index_copy_(0, ids, r[slot : slot + n].to(self.device, non_blocking=True))
        stream.synchronize()
