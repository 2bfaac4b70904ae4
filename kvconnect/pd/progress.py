"""The worker's progress thread: the only thread that touches the transport.

It takes work from an inbox (step metadata from the engine thread, push write requests from the
side-channel listener, handshake and checksum answers from the control thread), posts transfers,
polls them, reads notifications, and enforces every deadline. Between rounds it blocks on the
inbox for ``poll_interval_s`` while anything is in flight and ``idle_poll_interval_s`` otherwise.

The parts, each with one job:

* :mod:`kvconnect.pd.loop` -- the thread, the inbox, the poll cadence and the timers (no P/D);
* :mod:`kvconnect.pd.messages` -- the typed messages and timers it dispatches, by type;
* :mod:`kvconnect.pd.loads` -- the consumer's load machine (pull, push, checksum comparison);
* :mod:`kvconnect.pd.leases` -- the producer's leases and writes;
* :mod:`kvconnect.pd.results` -- what is handed to the engine thread, behind one lock.

:class:`ProgressLoop` wires them together: every message and timer and its handler are listed
in its constructor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvconnect.api import TransferResults
from kvconnect.config import PDConfig
from kvconnect.errors import KVConnectError, WireError
from kvconnect.metadata import HandshakeMetadata, decode
from kvconnect.pd import wire as W
from kvconnect.pd.control import ControlThread
from kvconnect.pd.leases import Leases
from kvconnect.pd.loads import Loads
from kvconnect.pd.loop import EventLoop
from kvconnect.pd.messages import (
    EarlyNoticesExpire,
    LeaseDeadline,
    LoadDeadline,
    PeerAnswer,
    PendingWriteExpire,
    ServedSumsExpire,
    StepMeta,
    SumsAnswer,
    SumsRetry,
    WriteRequested,
    WriteSent,
)
from kvconnect.pd.peers import LocalSide, PeerKey, Peers
from kvconnect.pd.results import Outcomes
from kvconnect.pd.state import Shared
from kvconnect.pd.transport import Transport

logger = logging.getLogger(__name__)

__all__ = ["ProgressLoop", "StepMeta", "WriteRequested", "decode_write_request"]


class ProgressLoop:
    def __init__(self, transport: Transport, local: LocalSide, cfg: PDConfig, control: ControlThread) -> None:
        self._t = transport
        self._events = EventLoop(
            name="kvconnect-pd-progress", poll_interval_s=cfg.poll_interval_s,
            idle_poll_interval_s=cfg.idle_poll_interval_s, busy=self.holds_work, poll=self._round,
            end_round=self._flush_notices,
        )
        self._peers = Peers(transport, local, self._fetch)
        self._outcomes = Outcomes()
        self._shared = Shared(transport, local, cfg, control, self._peers, self._events, self._outcomes)
        self.loads = Loads(self._shared)
        self.leases = Leases(self._shared)
        ev = self._events
        ev.handle(StepMeta, self._on_step)
        ev.handle(PeerAnswer, self._on_peer_answer)
        ev.handle(WriteRequested, self._on_write_requested)
        ev.handle(WriteSent, self.loads.on_write_sent)
        ev.handle(SumsAnswer, self.loads.on_sums)
        ev.on_timer(LoadDeadline, self.loads.on_deadline)
        ev.on_timer(SumsRetry, self.loads.on_sums_retry)
        ev.on_timer(LeaseDeadline, self.leases.on_deadline)
        ev.on_timer(EarlyNoticesExpire, self.leases.on_early_expire)
        ev.on_timer(PendingWriteExpire, self.leases.on_pending_write_expire)
        ev.on_timer(ServedSumsExpire, self.leases.on_served_sums_expire)

    # -- other threads ----------------------------------------------------------------------
    def post(self, item: object) -> None:
        """Hand the progress thread a message (:mod:`kvconnect.pd.messages`), from any thread."""
        if isinstance(item, tuple):
            item = _from_tuple(item)
        self._events.post(item)

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the progress thread, from any thread (e.g. an adapter's own bookkeeping
        that must not race the loads and leases)."""
        self._events.call(fn)

    def abort_loads(self, request_ids: tuple[str, ...]) -> None:
        """Engine thread, at bind time (before this step's results are taken): a load that ended
        but was not yet reported is turned into ``finished_sending`` at once; the others are
        noted, and the progress thread reports them when their transfer ended."""
        self._outcomes.abort_loads(request_ids)

    def take_results(self) -> TransferResults:
        return self._outcomes.take()

    def checksums_of(self, request_id: str) -> bytes:
        """The encoded checksums of a leased request (side-channel listener thread)."""
        return self.leases.checksums_of(request_id)

    def start(self) -> None:
        self._peers.prepare_self()
        self._events.start()

    def stop(self) -> None:
        self._events.stop(timeout=10)
        self.loads.release_all()
        self.leases.release_all()
        self._peers.close()

    @property
    def rounds(self) -> int:
        """Rounds run so far (the loop sleeps between rounds; tests check it does not spin)."""
        return self._events.rounds

    def holds_work(self) -> bool:
        """Whether a load, a lease or an early write request is in flight (the poll cadence)."""
        return bool(self.loads.active) or self.leases.holds_work()

    # -- the progress thread ----------------------------------------------------------------------
    def _round(self, now: float) -> None:
        for sender, msg in self._t.notifications():
            self._on_notice(sender, msg, now)
        self.loads.poll(now)
        self.leases.poll()

    def _on_notice(self, sender: str, msg: bytes, now: float) -> None:
        try:
            n = W.decode_notice(msg)
        except WireError as e:
            logger.debug("ignoring a notification from %s: %s", sender, e)
            return
        if n.kind == W.DONE:
            self.leases.on_done_notice(n, now)
        else:
            self.loads.on_producer_notice(n)

    def _on_step(self, m: StepMeta) -> None:
        meta = m.meta
        for lease in meta.leases:
            self.leases.on_lease(lease)
        for load in meta.loads:
            self.loads.on_request(load)
        for rel in meta.releases:
            self.loads.on_release_request(rel)
        for rid in meta.aborts:
            self.loads.on_abort(rid)

    def _on_peer_answer(self, m: PeerAnswer) -> None:
        self._peers.on_metadata(m.key, m.metadata, m.error)

    def _on_write_requested(self, m: WriteRequested) -> None:
        self.leases.on_write_request(m.request)

    def _fetch(self, key: PeerKey, host: str, port: int) -> None:
        def answered(md: HandshakeMetadata | None, err: KVConnectError | None) -> None:
            self._events.post(PeerAnswer(key, md, err))

        self._shared.control.fetch_metadata(host, port, answered)

    def _flush_notices(self) -> None:
        self._shared.flush_notices()


def _from_tuple(item: tuple) -> object:
    """The tuple form the worker's two messages had, ``("meta", metadata)`` and ``("write",
    request)``, for callers written against it."""
    if len(item) == 2 and item[0] == "meta":
        return StepMeta(item[1])
    if len(item) == 2 and item[0] == "write":
        return WriteRequested(item[1])
    raise TypeError(f"the progress loop takes message objects (kvconnect.pd.messages), not {item[:1]!r}")


def decode_write_request(body: bytes) -> W.WriteRequest:
    return decode(body, W.WriteRequest, what="write request")
