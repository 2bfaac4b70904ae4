"""What the P/D progress thread holds: a consumer's load in flight, a producer's lease, and what
the two machines (:mod:`kvconnect.pd.loads`, :mod:`kvconnect.pd.leases`) share.

Everything here is touched by the progress thread only, except :class:`Outcomes` (its own lock).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kvconnect.config import PDConfig
from kvconnect.errors import KVConnectError
from kvconnect.pd import wire as W
from kvconnect.pd.control import ControlThread
from kvconnect.pd.loop import EventLoop
from kvconnect.pd.peers import LocalSide, Peer, Peers
from kvconnect.pd.results import Outcomes
from kvconnect.pd.transport import Transport

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Load:
    spec: W.LoadSpec
    deadline: float
    started: float
    #: producer ranks still to handshake (pull) / to accept our write request (push)
    waiting: set[int] = field(default_factory=set)
    #: pull: (handle, producer peer, rank) per posted read
    handles: list[tuple[Any, Peer, int]] = field(default_factory=list)
    #: push: producer ranks whose ``written`` notice is awaited
    awaiting: set[int] = field(default_factory=set)
    done_ranks: set[int] = field(default_factory=set)
    nbytes: int = 0
    ndescs: int = 0
    #: verify_checksums: producer ranks whose checksums are still awaited, and those received
    sums_wanted: set[int] = field(default_factory=set)
    sums: dict[int, W.ChecksumReply] = field(default_factory=dict)
    #: every byte arrived; only the checksums are awaited
    arrived: bool = False
    #: why the load failed, while transfers it posted are still settling (see ``Loads.fail``)
    failure: str | None = None


@dataclass(slots=True, eq=False)
class Lease:
    spec: W.LeaseSpec
    deadline: float
    expected: frozenset[int] | None = None
    got: set[int] = field(default_factory=set)
    #: in-flight pushes: (handle, consumer peer, consumer request id, nbytes)
    writes: list[tuple[Any, Peer, str, int]] = field(default_factory=list)
    #: push: why a write of this lease failed (reported when the lease ends)
    failure: str | None = None


@dataclass(slots=True, eq=False)
class Shared:
    """The progress thread's collaborators, shared by the consumer and the producer machine."""

    transport: Transport
    me: LocalSide
    cfg: PDConfig
    control: ControlThread
    peers: Peers
    events: EventLoop
    outcomes: Outcomes
    #: notices to send at the end of this round (see ``notify``)
    outbox: list[tuple[Peer, W.Notice]] = field(default_factory=list)

    def notify(self, peer: Peer, notice: W.Notice) -> None:
        # Sent at the end of the round, after every transfer this round posts: a notice wakes the
        # peer, whose work would otherwise compete with this round's copies (measured on a 2-core
        # host: each read of a batch 15-25% slower).
        self.outbox.append((peer, notice))

    def flush_notices(self) -> None:
        if not self.outbox:
            return
        out, self.outbox = self.outbox, []
        for peer, notice in out:
            try:
                self.transport.notify(peer.agent, W.encode_notice(notice))
            except KVConnectError as e:
                logger.warning("could not notify %s rank %d (%s): %s", *peer.key, notice.kind, e)

    def mine(self, kind: str, rid: str) -> W.Notice:
        """A notice about ``rid`` from this rank."""
        return W.Notice(kind, rid, self.me.tp_size, self.me.tp_rank)

    def release(self, handle: Any) -> None:
        try:
            self.transport.release(handle)
        except Exception:
            logger.debug("releasing a transfer handle failed", exc_info=True)
