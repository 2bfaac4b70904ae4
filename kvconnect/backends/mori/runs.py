"""Pure batching for MoRI-IO: turn one transfer's paired descriptor rows into engine-level batch
entries. No I/O, no mori.

MoRI-IO's engine-level ``batch_read`` / ``batch_write`` take one entry per (local memory, remote
memory) pair -- a list of local offsets, a list of remote offsets and a list of sizes -- and return
one status per entry. :func:`batch_entries` groups rows by region pair and merges rows that are
contiguous on *both* sides into one larger row (fewer, larger RDMA operations), never letting one
row exceed ``max_bytes`` (MoRI refuses single requests over ``UINT32_MAX`` bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: MoRI-IO rejects one request larger than this (ERR_INVALID_ARGS "exceeds UINT32_MAX").
MAX_REQUEST_BYTES = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Entry:
    """One engine-level batch entry: rows between local region ``local`` and remote ``remote``."""

    local: int
    remote: int
    local_offsets: list[int]
    remote_offsets: list[int]
    sizes: list[int]


def batch_entries(
    local_region: np.ndarray,
    local_offset: np.ndarray,
    remote_region: np.ndarray,
    remote_offset: np.ndarray,
    size: np.ndarray,
    merge: bool = True,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> list[Entry]:
    """Rows ``i`` move ``size[i]`` bytes between ``(local_region[i], local_offset[i])`` and
    ``(remote_region[i], remote_offset[i])``. Returns one :class:`Entry` per region pair, in
    ascending ``(local, remote)`` order, its rows sorted by local offset and (with ``merge``)
    merged where contiguous on both sides."""
    lr = np.asarray(local_region, dtype=np.int64)
    lo = np.asarray(local_offset, dtype=np.int64)
    rr = np.asarray(remote_region, dtype=np.int64)
    ro = np.asarray(remote_offset, dtype=np.int64)
    n = np.asarray(size, dtype=np.int64)
    if not (lr.shape == lo.shape == rr.shape == ro.shape == n.shape) or lr.ndim != 1:
        raise ValueError("batch_entries: the five row arrays must be 1-D and of one length")
    keep = n > 0
    if not keep.all():
        lr, lo, rr, ro, n = lr[keep], lo[keep], rr[keep], ro[keep], n[keep]
    if lr.size == 0:
        return []
    order = np.lexsort((lo, rr, lr))
    lr, lo, rr, ro, n = lr[order], lo[order], rr[order], ro[order], n[order]
    new_pair = np.ones(lr.size, dtype=bool)
    new_pair[1:] = (lr[1:] != lr[:-1]) | (rr[1:] != rr[:-1])
    if merge:
        brk = new_pair.copy()
        brk[1:] |= (lo[1:] != lo[:-1] + n[:-1]) | (ro[1:] != ro[:-1] + n[:-1])
        starts = np.flatnonzero(brk)
        n = np.add.reduceat(n, starts)
        lr, lo, rr, ro, new_pair = lr[starts], lo[starts], rr[starts], ro[starts], new_pair[starts]
    if int(n.max()) > max_bytes:
        lr, lo, rr, ro, n, new_pair = _split(lr, lo, rr, ro, n, new_pair, max_bytes)
    bounds = [*np.flatnonzero(new_pair).tolist(), int(lr.size)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out.append(Entry(int(lr[a]), int(rr[a]), lo[a:b].tolist(), ro[a:b].tolist(), n[a:b].tolist()))
    return out


def _split(lr, lo, rr, ro, n, new_pair, max_bytes: int):
    """Cut rows over ``max_bytes`` into pieces of at most ``max_bytes``."""
    pieces = -(-n // max_bytes)
    rep = np.repeat(np.arange(n.size), pieces)
    k = np.arange(rep.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number in its row
    step = k * max_bytes
    sizes = np.minimum(n[rep] - step, max_bytes)
    first = k == 0
    return lr[rep], lo[rep] + step, rr[rep], ro[rep] + step, sizes, new_pair[rep] & first
