"""KV checksums of a P/D transfer (``verify_checksums``).

The producer takes :func:`kvconnect.integrity.token_head_sums` of a request's blocks when it
leases them (:func:`lease_checksums`) and serves them on the side channel from a
:class:`ServedChecksums`; the consumer, once every byte of a load arrived, computes its own and
compares (:func:`load_mismatch`). When to take, ask and verify is the progress loop's business;
this module only computes and stores.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from kvconnect import integrity
from kvconnect.errors import LayoutError, WireError
from kvconnect.metadata import encode
from kvconnect.pd import plan as P
from kvconnect.pd import wire as W
from kvconnect.pd.peers import LocalSide

logger = logging.getLogger(__name__)

#: How a producer refuses checksums it does not hold (yet); consumers ask again after a pause.
NOT_READY = "no KV checksums leased yet"
#: Checksum-table entry of a token in a null block (hybrid models): never compared.
NULL_SUM = np.int64(-0x5A5A5A5A5A5A5A5B)


def lease_checksums(me: LocalSide, block_ids: Sequence[Sequence[int]]) -> bytes:
    """Producer: the encoded :class:`~kvconnect.pd.wire.ChecksumReply` of a leased request's
    blocks, one table per KV-cache group. Raises IndexError/RuntimeError/ValueError when the
    blocks cannot be read."""
    tables = []
    for g, ids in enumerate(block_ids):
        layers = [(t, lay) for t, lay in me.layers if lay.group == g]
        bs = me.block_sizes[g] if g < len(me.block_sizes) else me.block_sizes[0]
        tab = integrity.token_head_sums(layers, ids, bs, 0, len(ids) * bs)
        if len(block_ids) > 1:  # mark tokens of null blocks: consumers skip them
            tab[np.repeat(np.asarray(ids) == 0, bs)] = NULL_SUM
        tables.append(np.ascontiguousarray(tab, dtype="<i8").tobytes())
    heads = max(1, max((lay.num_heads if not lay.is_mla else 1) for _, lay in me.layers))
    return encode(W.ChecksumReply(heads=heads, tables=tuple(tables)))


def load_mismatch(me: LocalSide, spec: W.LoadSpec, sums: Mapping[int, W.ChecksumReply]) -> str | None:
    """Consumer: None when what arrived for ``spec`` matches every source rank's checksums
    (``sums``, by producer rank), else what differs."""
    ts, te = spec.token_start, spec.token_end
    hybrid = len(spec.local_block_ids) > 1
    bad_blocks: set[int] = set()
    try:
        for g in sorted({lay.group for _, lay in me.layers}):
            layers = [(t, lay) for t, lay in me.layers if lay.group == g]
            bs = me.block_sizes[g]
            local_ids = spec.local_block_ids[g]
            mine = integrity.token_head_sums(layers, local_ids, bs, ts, te)
            keep = np.ones(te - ts, bool)
            if hybrid:  # null blocks (id 0) are not transferred; the producer marks its own
                keep &= np.asarray(local_ids)[np.arange(ts, te) // bs] != 0
            for p, reply in sums.items():
                if g >= len(reply.tables):
                    return f"producer rank {p} sent checksums for {len(reply.tables)} KV-cache groups"
                theirs = np.frombuffer(reply.tables[g], dtype="<i8").reshape(-1, reply.heads)
                if len(theirs) < te:
                    return f"producer rank {p} has checksums for {len(theirs)} tokens, the load needs {te}"
                theirs = theirs[ts:te]
                pairs = P.consumer_head_pairs(
                    me.num_heads, me.tp_size, me.tp_rank, spec.remote.tp_size, p, me.mla
                )
                for mine_h, peer_h, n in pairs:
                    if mine_h + n > mine.shape[1] or peer_h + n > theirs.shape[1]:
                        return f"producer rank {p}: checksum tables do not cover the heads read"
                    diff = (mine[:, mine_h:mine_h + n] != theirs[:, peer_h:peer_h + n]).any(axis=1) & keep
                    if hybrid:
                        diff &= theirs[:, peer_h] != NULL_SUM
                    for t in np.flatnonzero(diff):
                        bad_blocks.add(int(local_ids[(ts + int(t)) // bs]))
    except (IndexError, LayoutError, RuntimeError, ValueError) as e:
        return f"checksums could not be computed: {e}"
    if bad_blocks:
        logger.error("request %s: KV checksum mismatch in block(s) %s (from %s request %s)",
                     spec.request_id, sorted(bad_blocks), spec.remote.engine_id, spec.remote_request_id)
        return f"KV checksum mismatch in block(s) {sorted(bad_blocks)}"
    return None


class ServedChecksums:
    """Producer: encoded checksums per leased request, read by the side-channel listener thread.
    A lease that ended moves to ``retired`` for a while: a push consumer may ask after its blocks
    were written and freed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, bytes] = {}
        self._retired: dict[str, bytes] = {}

    def __len__(self) -> int:
        """Leased requests whose checksums are served."""
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live

    def put(self, request_id: str, data: bytes) -> None:
        with self._lock:
            self._live[request_id] = data

    def retire(self, request_id: str) -> bytes | None:
        """The lease ended: its checksums, now retired (None if there were none)."""
        if not self._live:
            return None
        with self._lock:
            data = self._live.pop(request_id, None)
            if data is not None:
                self._retired[request_id] = data
        return data

    def forget(self, request_id: str, data: bytes) -> None:
        """Drop retired checksums (unless the id has been retired again since, with other data)."""
        with self._lock:
            if self._retired.get(request_id) is data:
                del self._retired[request_id]

    def get(self, request_id: str) -> bytes:
        with self._lock:
            data = self._live.get(request_id) or self._retired.get(request_id)
        if data is None:
            raise WireError(f"request {request_id}: {NOT_READY} (or its lease ended)")
        return data
