"""Handshaken peers: one entry per peer (engine id, TP rank), fetched once over the side channel,
verified, loaded into the transport, with descriptor plans prepared once per direction.

Runs on the progress thread only (it calls the transport); the fetch itself is done by the
control thread and comes back through the progress thread's inbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvconnect.errors import CompatibilityError, HandshakeError, KVConnectError, LayoutError
from kvconnect.metadata import HandshakeMetadata
from kvconnect.pd import plan as P
from kvconnect.pd.transport import Transport

logger = logging.getLogger(__name__)

PeerKey = tuple[str, int]
CONSUMER = "consumer"  # we read from / are written by this peer
PRODUCER = "producer"  # we are read from / write to this peer


@dataclass(slots=True)
class LocalSide:
    """What the P/D loop needs to know about its own worker."""

    engine_id: str
    tp_size: int
    tp_rank: int
    num_heads: int
    mla: bool
    block_sizes: tuple[int, ...]
    placed: list[P.PlacedLayer]
    compat_hash: str
    #: Side-channel address peers reach this worker at (for push-mode write requests).
    host: str
    port: int
    #: Side-channel base port (rank 0) of this engine.
    base_port: int
    #: ``(tensor, layout)`` of every layer in model order (for ``verify_checksums``; may be empty).
    layers: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Route:
    """A prepared descriptor plan towards one peer in one direction (None plan: nothing to move,
    the peer only takes part through notifications)."""

    plan: P.PeerPlan | None
    local: Any = None
    remote: Any = None


@dataclass(slots=True)
class Peer:
    key: PeerKey
    ready: bool = False
    meta: HandshakeMetadata | None = None
    agent: str = ""
    placed: list[P.PlacedLayer] = field(default_factory=list)
    routes: dict[str, Route] = field(default_factory=dict)
    waiters: list[Callable[[Peer | None, KVConnectError | None], None]] = field(default_factory=list)


class Peers:
    def __init__(
        self, transport: Transport, local: LocalSide, fetch: Callable[[PeerKey, str, int], None]
    ) -> None:
        self._t = transport
        self._local = local
        self._fetch = fetch
        self._peers: dict[PeerKey, Peer] = {}
        #: Local prepared lists shared by every plan with the same local descriptors.
        self._local_prepped: dict[bytes, Any] = {}
        self._retired: list[Any] = []
        self.handshakes = 0
        self.handshake_failures = 0

    def prepare_self(self) -> None:
        """Prepare the local list a peer identical to this worker will need, at registration."""
        me = self._local
        pairs = P.consumer_head_pairs(me.num_heads, me.tp_size, me.tp_rank, me.tp_size, me.tp_rank, me.mla)
        plan = P.build_plan(me.placed, me.placed, me.block_sizes, me.block_sizes, pairs, "self")
        self._local_prepped[plan.local_key] = self._t.prepare(None, plan.local_descs)

    def get(self, key: PeerKey) -> Peer | None:
        return self._peers.get(key)

    def when_ready(
        self, key: PeerKey, host: str, port: int, cb: Callable[[Peer | None, KVConnectError | None], None]
    ) -> None:
        """Call ``cb(peer, None)`` once the peer is handshaken, or ``cb(None, error)``."""
        peer = self._peers.get(key)
        if peer is not None and peer.ready:
            cb(peer, None)
            return
        if peer is None:
            peer = self._peers[key] = Peer(key)
            self._fetch(key, host, port)
        peer.waiters.append(cb)

    def on_metadata(self, key: PeerKey, meta: HandshakeMetadata | None, error: KVConnectError | None) -> None:
        """The control thread's answer for ``key`` (progress thread)."""
        peer = self._peers.get(key)
        if peer is None or peer.ready:
            return
        if error is None:
            try:
                self._load(peer, meta)
            except KVConnectError as e:
                error = e
        waiters, peer.waiters = peer.waiters, []
        if error is not None:
            self.handshake_failures += 1
            self._peers.pop(key, None)  # the next request tries again
            logger.warning("handshake with %s rank %d failed: %s", key[0], key[1], error)
            for cb in waiters:
                cb(None, error)
            return
        self.handshakes += 1
        for cb in waiters:
            cb(peer, None)

    def _load(self, peer: Peer, meta: HandshakeMetadata) -> None:
        me = self._local
        engine, rank = peer.key
        where = f"{engine} rank {rank}"
        if meta.engine_id != engine or meta.tp_rank != rank:
            raise HandshakeError(
                f"peer at the address of {where} says it is {meta.engine_id} rank {meta.tp_rank}"
            )
        if meta.compat_hash != me.compat_hash:
            raise CompatibilityError(
                f"peer {where} runs an incompatible model or KV layout (compatibility hash "
                f"{meta.compat_hash}, ours {me.compat_hash}): its KV cannot be used here"
            )
        if meta.transport != self._t.name:
            raise CompatibilityError(
                f"peer {where} uses transport {meta.transport!r}, this worker {self._t.name!r}"
            )
        try:
            regions, placed = P.place_layers(meta.layers)
            P.check_heads(me.num_heads, meta.tp_size, meta.tp_rank, placed, f"peer {engine}")
        except LayoutError as e:
            raise CompatibilityError(f"peer {where}: {e}") from e
        peer.agent = self._t.add_peer(meta.transport_metadata, regions)
        for route in peer.routes.values():  # a re-handshake replaces stale prepared lists
            if route.remote is not None:
                self._retired.append(route.remote)
        peer.meta, peer.placed, peer.routes, peer.ready = meta, placed, {}, True

    def route(self, peer: Peer, direction: str) -> Route:
        """The prepared plan towards ``peer`` (built and prepared on first use)."""
        r = peer.routes.get(direction)
        if r is not None:
            return r
        me, meta = self._local, peer.meta
        assert meta is not None
        if direction == CONSUMER:
            pairs = P.consumer_head_pairs(
                me.num_heads, me.tp_size, me.tp_rank, meta.tp_size, meta.tp_rank, me.mla
            )
        else:
            pairs = P.producer_head_pairs(
                me.num_heads, me.tp_size, me.tp_rank, meta.tp_size, meta.tp_rank, me.mla
            )
        if not pairs:
            r = Route(None)
        else:
            plan = P.build_plan(me.placed, peer.placed, me.block_sizes, meta.block_sizes, pairs,
                                f"{meta.engine_id} rank {meta.tp_rank}")
            local = self._local_prepped.get(plan.local_key)
            if local is None:
                local = self._local_prepped[plan.local_key] = self._t.prepare(None, plan.local_descs)
            r = Route(plan, local, self._t.prepare(peer.agent, plan.remote_descs))
        peer.routes[direction] = r
        return r

    def forget(self, key: PeerKey) -> None:
        """Drop a peer after a transport failure: the next request handshakes afresh (a restarted
        peer comes back with new metadata)."""
        peer = self._peers.get(key)
        if peer is not None and peer.ready:
            del self._peers[key]
            for r in peer.routes.values():
                if r.remote is not None:
                    self._retired.append(r.remote)

    def close(self) -> None:
        for prepared in [*self._retired, *self._local_prepped.values()]:
            try:
                self._t.release_prepared(prepared)
            except Exception:
                logger.debug("releasing a prepared list failed", exc_info=True)
        for peer in self._peers.values():
            for r in peer.routes.values():
                if r.remote is not None:
                    try:
                        self._t.release_prepared(r.remote)
                    except Exception:
                        logger.debug("releasing a prepared list failed", exc_info=True)
        self._peers.clear()
        self._local_prepped.clear()
        self._retired.clear()
