"""Pure P/D transfer planning: which peer ranks take part, which descriptors to prepare once per
peer, and the index lists of one request's transfer. No I/O, no transport.

A *plan* pairs this worker's layers with one peer rank's layers. Transfers move *units* of ``g``
tokens (``g`` = gcd of both sides' tensor block sizes), so block-size mismatch in either direction
needs no special case. For every layer the plan prepares, on each side, one descriptor per
``(block, unit, piece)``, where the *pieces* are the byte runs of one unit paired row for row
(:func:`kvconnect.layout.pair_rows`) over the heads this pair of ranks exchanges (heterogeneous
TP; MLA caches are whole). A transfer is then just two index arrays, computed vectorised; the
transport merges descriptors that turn out contiguous on both sides.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from kvconnect.errors import CompatibilityError, LayoutError
from kvconnect.layout import KVLayout, head_sources, head_targets, pair_rows, rank_heads
from kvconnect.metadata import LayerRegion

# -- memory regions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacedLayer:
    """One layer's KV tensor: its layout and where it lies in a registered region."""

    name: str
    layout: KVLayout
    region: int
    offset: int


def layout_of(r: LayerRegion) -> KVLayout:
    return KVLayout(
        dims=tuple(r.dims), shape=tuple(r.shape), strides=tuple(r.strides),
        itemsize=r.itemsize, dtype=r.dtype, group=r.group,
    )


def place_layers(layers: Sequence[LayerRegion]) -> tuple[list[tuple[int, int]], list[PlacedLayer]]:
    """Union of the layers' byte spans as registration regions (overlapping or touching spans
    share one region), and each layer placed in its region. Both peers run this on the same
    :class:`LayerRegion` list, so they agree on region numbering without sending it."""
    spans = []
    for i, r in enumerate(layers):
        lay = layout_of(r)
        spans.append((r.base_addr, r.base_addr + lay.span_bytes, i, lay))
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    regions: list[list[int]] = []
    region_of = [0] * len(spans)
    for i in order:
        lo, hi = spans[i][0], spans[i][1]
        if regions and lo <= regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], hi)
        else:
            regions.append([lo, hi])
        region_of[i] = len(regions) - 1
    placed = [
        PlacedLayer(layers[i].name, spans[i][3], region_of[i], spans[i][0] - regions[region_of[i]][0])
        for i in range(len(spans))
    ]
    return [(lo, hi - lo) for lo, hi in regions], placed


# -- which ranks take part ------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def expected_consumers(num_heads: int, p_tp: int, p_rank: int, c_tp: int, mla: bool) -> frozenset[int]:
    """Consumer ranks a producer rank waits for before freeing: those that read from it, or,
    when none does (MLA or replicated heads), one designated rank so that it is still told."""
    readers = head_targets(num_heads, p_tp, p_rank, c_tp, mla)
    return frozenset(readers) if readers else frozenset({p_rank % c_tp})


@lru_cache(maxsize=1024)
def producers_to_notify(num_heads: int, c_tp: int, c_rank: int, p_tp: int, mla: bool) -> tuple[int, ...]:
    """Producer ranks this consumer rank must tell when it is done (mirror of the above)."""
    return tuple(p for p in range(p_tp) if c_rank in expected_consumers(num_heads, p_tp, p, c_tp, mla))


@lru_cache(maxsize=1024)
def source_ranks(num_heads: int, c_tp: int, c_rank: int, p_tp: int, mla: bool) -> tuple[int, ...]:
    """Producer ranks holding KV this consumer rank needs (each head from exactly one)."""
    return tuple(sorted({s.remote_rank for s in head_sources(num_heads, c_tp, c_rank, p_tp, mla)}))


#: ``(my_first_head, peer_first_head, count)``; heads index each side's own head dimension.
HeadPair = tuple[int, int, int]


def consumer_head_pairs(
    num_heads: int, c_tp: int, c_rank: int, p_tp: int, p_rank: int, mla: bool
) -> tuple[HeadPair, ...]:
    return tuple(
        (s.local_head, s.remote_head, s.count)
        for s in head_sources(num_heads, c_tp, c_rank, p_tp, mla)
        if s.remote_rank == p_rank
    )


def producer_head_pairs(
    num_heads: int, p_tp: int, p_rank: int, c_tp: int, c_rank: int, mla: bool
) -> tuple[HeadPair, ...]:
    slices = head_targets(num_heads, p_tp, p_rank, c_tp, mla).get(c_rank, [])
    return tuple((s.remote_head, s.local_head, s.count) for s in slices)


# -- descriptor plans -----------------------------------------------------------------------------
@dataclass(slots=True)
class _Class:
    """Layers of one group that share unit geometry: their indices are computed together."""

    group: int
    g: int
    k: int
    t_local: int
    t_remote: int
    nb_local: int
    nb_remote: int
    local_base: np.ndarray
    remote_base: np.ndarray


@dataclass(slots=True)
class PeerPlan:
    local_descs: np.ndarray
    remote_descs: np.ndarray
    classes: list[_Class]
    #: Engine block size per group on each side.
    local_block_sizes: tuple[int, ...]
    remote_block_sizes: tuple[int, ...]
    #: Skip pairs whose block id is 0 on either side (the null block of hybrid models).
    skip_null: bool
    local_key: bytes = field(default=b"")

    @property
    def num_groups(self) -> int:
        return len(self.local_block_sizes)

    def indices(
        self, local_ids: Sequence[Sequence[int]], remote_ids: Sequence[Sequence[int]],
        token_start: int, token_end: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays into ``local_descs`` / ``remote_descs`` moving tokens
        ``[token_start, token_end)``; per-group id lists both start at token 0."""
        if len(local_ids) != self.num_groups or len(remote_ids) != self.num_groups:
            raise LayoutError(
                f"block ids for {len(local_ids)} local / {len(remote_ids)} remote KV-cache groups, "
                f"the model has {self.num_groups}"
            )
        ids_l = [_id_array(g, "local") for g in local_ids]
        ids_r = [_id_array(g, "remote") for g in remote_ids]
        out_l, out_r = [], []
        for c in self.classes:
            e_l, e_r = self.local_block_sizes[c.group], self.remote_block_sizes[c.group]
            tok = np.arange(token_start // c.g, -(-token_end // c.g), dtype=np.int64) * c.g
            if tok.size == 0:
                continue
            lunit, keep_l = _units(ids_l[c.group], tok, e_l, c.t_local, c.g, c.nb_local, "local")
            runit, keep_r = _units(ids_r[c.group], tok, e_r, c.t_remote, c.g, c.nb_remote, "remote")
            if self.skip_null:
                keep = keep_l & keep_r
                if not keep.all():
                    lunit, runit = lunit[keep], runit[keep]
            piece = np.arange(c.k, dtype=np.int64)[None, :, None]
            out_l.append((c.local_base[:, None, None] + piece + (lunit * c.k)[None, None, :]).ravel())
            out_r.append((c.remote_base[:, None, None] + piece + (runit * c.k)[None, None, :]).ravel())
        if not out_l:
            return np.zeros(0, np.int32), np.zeros(0, np.int32)
        li, ri = np.concatenate(out_l), np.concatenate(out_r)
        dtype = np.int32 if max(len(self.local_descs), len(self.remote_descs)) < 2**31 else np.int64
        return li.astype(dtype, copy=False), ri.astype(dtype, copy=False)

    def nbytes(self, local_idx: np.ndarray) -> int:
        return int(self.local_descs[local_idx, 2].sum()) if local_idx.size else 0


def _id_array(ids: Sequence[int], side: str) -> np.ndarray:
    """One group's block ids as int64. Ids come from a router's ``remote_block_ids`` unchecked
    (the scheduler thread does not walk them): anything but a flat list of integers is refused here
    (negative and too-large ids by :func:`_units`, against the cache's size)."""
    try:
        a = np.asarray(ids)
    except (ValueError, TypeError):
        a = None
    if a is None or a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        shown = repr(ids)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        what = "remote block ids (the router's remote_block_ids)" if side == "remote" else f"{side} block ids"
        raise LayoutError(f"{what} must be a list of integers, got {shown}")
    return a.astype(np.int64, copy=False)


def _units(ids: np.ndarray, tok: np.ndarray, engine_bs: int, tensor_bs: int, g: int, nb: int, side: str):
    pos = tok // engine_bs
    if pos.size and int(pos[-1]) >= ids.size:
        raise LayoutError(
            f"{side} block ids cover {ids.size * engine_bs} tokens, the transfer needs {int(tok[-1]) + g}"
        )
    eng = ids[pos]
    per = engine_bs // tensor_bs
    blk = eng * per + (tok % engine_bs) // tensor_bs
    if eng.size and (int(eng.min()) < 0 or int(blk.max()) >= nb):
        bad = int(eng.min()) if int(eng.min()) < 0 else int(eng.max())
        raise LayoutError(f"{side} block id {bad} outside the KV cache ({nb // per} blocks)")
    return blk * (tensor_bs // g) + (tok % tensor_bs) // g, eng != 0


def _pattern(local: KVLayout, remote: KVLayout, g: int, pairs: Sequence[HeadPair]) -> np.ndarray:
    if local.is_mla:
        return pair_rows(local, remote, (0, g), (0, g))
    parts = [
        pair_rows(local, remote, (0, g), (0, g), (mine, mine + n), (peer, peer + n))
        for mine, peer, n in pairs
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)


def _table(lay: KVLayout, region: int, offset: int, g: int, rel: np.ndarray, ln: np.ndarray) -> np.ndarray:
    nb, units = lay.num_blocks, lay.block_size // g
    off = (
        offset
        + np.arange(nb, dtype=np.int64)[:, None, None] * lay.stride_bytes("block")
        + np.arange(units, dtype=np.int64)[None, :, None] * (g * lay.stride_bytes("token"))
        + rel[None, None, :]
    ).ravel()
    out = np.empty((off.size, 3), dtype=np.int64)
    out[:, 0] = region
    out[:, 1] = off
    out[:, 2] = np.tile(ln, nb * units)
    return out


def build_plan(
    local: Sequence[PlacedLayer],
    remote: Sequence[PlacedLayer],
    local_block_sizes: Sequence[int],
    remote_block_sizes: Sequence[int],
    pairs: Sequence[HeadPair],
    peer: str,
) -> PeerPlan:
    """Pair layers one for one (same order, same names) and lay out both descriptor tables.
    Raises CompatibilityError naming the first difference."""
    if len(local) != len(remote):
        raise CompatibilityError(f"peer {peer} has {len(remote)} KV layers, this worker {len(local)}")
    if len(local_block_sizes) != len(remote_block_sizes):
        raise CompatibilityError(
            f"peer {peer} has {len(remote_block_sizes)} KV-cache groups, this worker {len(local_block_sizes)}"
        )
    l_descs, r_descs, classes = [], [], {}
    l_count = r_count = 0
    for a, b in zip(local, remote):
        la, lb = a.layout, b.layout
        if a.name != b.name or la.signature() != lb.signature() or la.group != lb.group:
            raise CompatibilityError(
                f"peer {peer}: layer {b.name!r} {lb.signature()} (group {lb.group}) does not match "
                f"local layer {a.name!r} {la.signature()} (group {la.group})"
            )
        if not la.is_mla:
            for mine, theirs, n in pairs:
                if mine + n > la.num_heads or theirs + n > lb.num_heads:
                    raise CompatibilityError(
                        f"peer {peer}: layer {a.name!r} holds {lb.num_heads} KV heads per rank, "
                        f"this worker {la.num_heads}: the TP split does not match the head count"
                    )
        g = math.gcd(la.block_size, lb.block_size)
        pat = _pattern(la, lb, g, pairs)
        key = (la.group, g, len(pat), la.block_size, lb.block_size, la.num_blocks, lb.num_blocks)
        cls = classes.get(key)
        if cls is None:
            cls = classes[key] = [[], []]
        cls[0].append(l_count)
        cls[1].append(r_count)
        lt = _table(la, a.region, a.offset, g, pat[:, 0], pat[:, 2])
        rt = _table(lb, b.region, b.offset, g, pat[:, 1], pat[:, 2])
        l_descs.append(lt)
        r_descs.append(rt)
        l_count += len(lt)
        r_count += len(rt)
    for gi, (lbs, rbs) in enumerate(zip(local_block_sizes, remote_block_sizes)):
        for lay, bs, side in ((local, lbs, "local"), (remote, rbs, "remote")):
            for p in lay:
                if p.layout.group == gi and bs % p.layout.block_size:
                    raise CompatibilityError(
                        f"{side} layer {p.name!r}: engine block size {bs} is not a multiple of "
                        f"its tensor block size {p.layout.block_size}"
                    )
    plan = PeerPlan(
        local_descs=np.concatenate(l_descs) if l_descs else np.zeros((0, 3), np.int64),
        remote_descs=np.concatenate(r_descs) if r_descs else np.zeros((0, 3), np.int64),
        classes=[
            _Class(k[0], k[1], k[2], k[3], k[4], k[5], k[6],
                   np.asarray(v[0], np.int64), np.asarray(v[1], np.int64))
            for k, v in classes.items()
        ],
        local_block_sizes=tuple(local_block_sizes),
        remote_block_sizes=tuple(remote_block_sizes),
        skip_null=len(local_block_sizes) > 1,
    )
    plan.local_key = hashlib.blake2b(plan.local_descs.tobytes(), digest_size=16).digest()
    return plan


def check_heads(num_heads: int, tp: int, rank: int, layers: Sequence[PlacedLayer], who: str) -> None:
    """A rank's layers must hold the heads its TP split gives it."""
    lo, hi = rank_heads(num_heads, tp, rank)
    for p in layers:
        if not p.layout.is_mla and p.layout.num_heads != hi - lo:
            raise CompatibilityError(
                f"{who} rank {rank}/{tp}: layer {p.name!r} holds {p.layout.num_heads} KV heads, "
                f"a model with {num_heads} KV heads at TP {tp} gives it {hi - lo}"
            )
