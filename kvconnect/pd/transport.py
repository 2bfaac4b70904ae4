"""The transfer-engine interface the P/D core drives. NIXL and MoRI-IO each implement it.

Everything above this interface (handshakes, plans, leases, deadlines, TP and block-size mapping)
is shared P/D logic; everything below it is one transfer engine. A transport is owned by exactly
one thread (the worker's progress thread): implementations need no locking.

Memory is named by *regions*: contiguous byte ranges, registered once. A descriptor is a row
``(region, offset, nbytes)`` -- an index into the registered region list (local, or the list
given for a peer in :meth:`Transport.add_peer`), a byte offset into that region, a length.
Descriptor lists are prepared once (local ones after registration, remote ones once per peer);
a transfer then names only *indices* into two prepared lists, pairwise (``local_idx[i]`` moves to
or from ``remote_idx[i]``; lengths match).

Call order::

    t.register(regions, "cpu")               # once
    blob = t.metadata()                      # published to peers (handshake)
    peer = t.add_peer(peer_blob, peer_regions)
    lp = t.prepare(None, local_descs)        # once
    rp = t.prepare(peer, remote_descs)       # once per peer (and per peer layout plan)
    h = t.start(READ, peer, lp, lidx, rp, ridx, notify=b"...")
    while t.poll(h) is Status.BUSY: ...      # the owner sleeps between polls
    t.release(h)
    for sender, msg in t.notifications(): ...  # also progresses the engine as a target
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from typing import Any

import numpy as np


class Op(str, enum.Enum):
    #: Pull: copy remote memory into local memory.
    READ = "READ"
    #: Push: copy local memory into remote memory.
    WRITE = "WRITE"


class Status(enum.Enum):
    BUSY = 0
    DONE = 1
    FAILED = 2


#: ``(address, nbytes)`` of one registered memory region.
Region = tuple[int, int]


class Transport(abc.ABC):
    """A thin wrapper over one transfer engine. Methods raise only :class:`TransferError`
    (or a subclass of :class:`KVConnectError`); :meth:`poll` never raises."""

    #: Short name, carried in handshakes (``"nixl"``, ``"mori"``): peers must use the same.
    name: str = "abstract"

    @property
    @abc.abstractmethod
    def agent_name(self) -> str:
        """This engine's name as peers know it (NIXL agent name, MoRI engine key)."""

    @abc.abstractmethod
    def register(self, regions: Sequence[Region], device: str = "cpu") -> None:
        """Register local memory once; region ``i`` is ``regions[i]`` in descriptors.
        ``device`` is where it lives, as torch names it (``cpu``, ``cuda:0``)."""

    @abc.abstractmethod
    def metadata(self) -> bytes:
        """Opaque blob a peer passes to :meth:`add_peer` (call after :meth:`register`)."""

    @abc.abstractmethod
    def add_peer(self, metadata: bytes, regions: Sequence[Region]) -> str:
        """Load a peer's blob; ``regions`` are the peer's registered regions in its order.
        Returns the peer handle used by the other calls. Loading the same peer again refreshes
        it. Garbage raises :class:`~kvconnect.errors.HandshakeError`."""

    @abc.abstractmethod
    def remove_peer(self, peer: str) -> None: ...

    @abc.abstractmethod
    def prepare(self, peer: str | None, descs: np.ndarray) -> Any:
        """Prepare ``descs`` (``[n, 3]`` int64: region, offset, nbytes) once. ``peer`` None means
        local memory. Returns an opaque prepared list."""

    @abc.abstractmethod
    def release_prepared(self, prepared: Any) -> None: ...

    @abc.abstractmethod
    def start(
        self,
        op: Op,
        peer: str,
        local: Any,
        local_idx: np.ndarray,
        remote: Any,
        remote_idx: np.ndarray,
        notify: bytes | None = None,
    ) -> Any:
        """Post one transfer of the paired descriptors; ``notify`` is delivered to the peer
        after the data (and only if the transfer succeeded). Returns a handle for :meth:`poll`."""

    @abc.abstractmethod
    def poll(self, handle: Any) -> Status:
        """Progress and check one transfer. Never raises: any error is ``Status.FAILED``."""

    @abc.abstractmethod
    def release(self, handle: Any) -> None:
        """Forget a handle; releasing one still in flight cancels it."""

    @abc.abstractmethod
    def notify(self, peer: str, message: bytes) -> None:
        """Send a standalone notification (best effort; raises TransferError if it cannot)."""

    @abc.abstractmethod
    def notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as ``(sender agent name, message)``.
        Calling it also progresses this engine as a transfer *target*."""

    def close(self) -> None:
        return None
