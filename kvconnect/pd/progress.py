"""The worker's progress thread: the only thread that touches the transport.

It takes work from an inbox (step metadata from the engine thread, push write requests from the
side-channel listener, handshake answers from the control thread), posts transfers, polls them,
reads notifications, and enforces every deadline. Between rounds it blocks on the inbox for
``poll_interval_s`` while anything is in flight and ``idle_poll_interval_s`` otherwise.

Consumer (loads)
    pull: handshake with the producer ranks involved, READ from each source rank, then tell every
    producer rank ``done`` (the producer frees when it arrives). The notice is sent after the read
    rather than attached to it: an attached notification makes the read's completion wait for the
    producer's next progress round, a latency on every request.
    push: send a write request to each producer rank over the side channel; wait for a
    ``written`` notice from every source rank.
    A load succeeds only when every transfer (or notice) it waits for arrived; any failure or
    the deadline fails it: its local blocks are reported invalid.
Producer (leases)
    blocks of a finished request are held until every expected consumer rank said ``done``
    (pull) or was written (push), or until the lease expires; then ``finished_sending``.
Integrity (``verify_checksums``)
    the producer takes checksums of a request's blocks when it leases them
    (:mod:`kvconnect.pd.checksums`) and serves them on the side channel; the consumer asks every source
    rank for them when the load starts (alongside the handshake and the read), and once the bytes
    arrived computes its own and compares, before reporting the load. A mismatch fails the load.
Aborts
    a load whose request the engine aborted runs to its end (a READ in flight may still write into
    the blocks); it is then reported in ``finished_sending`` so the engine frees the blocks.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvconnect.api import TransferResults
from kvconnect.config import PDConfig
from kvconnect.errors import KVConnectError, LayoutError, PeerRefusedError, TransferError, WireError
from kvconnect.metadata import decode, encode
from kvconnect.pd import checksums as C
from kvconnect.pd import plan as P
from kvconnect.pd import wire as W
from kvconnect.pd.control import ControlThread
from kvconnect.pd.params import resolve_load, resolve_release
from kvconnect.pd.peers import CONSUMER, PRODUCER, LocalSide, Peer, PeerKey, Peers
from kvconnect.pd.transport import Op, Status, Transport
from kvconnect.telemetry import record_transfer

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Load:
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
    #: why the load failed, while transfers it posted are still settling (see ``_fail_load``)
    failure: str | None = None


@dataclass(slots=True, eq=False)
class _Lease:
    spec: W.LeaseSpec
    deadline: float
    expected: frozenset[int] | None = None
    got: set[int] = field(default_factory=set)
    #: in-flight pushes: (handle, consumer peer, consumer request id, nbytes)
    writes: list[tuple[Any, Peer, str, int]] = field(default_factory=list)
    #: push: why a write of this lease failed (reported with ``finished_sending``)
    failure: str | None = None


class ProgressLoop:
    def __init__(self, transport: Transport, local: LocalSide, cfg: PDConfig, control: ControlThread) -> None:
        self._t = transport
        self._me = local
        self._cfg = cfg
        self._control = control
        self._inbox: queue.Queue = queue.Queue()
        self._peers = Peers(transport, local, self._fetch)
        self._loads: dict[str, _Load] = {}
        self._leases: dict[str, _Lease] = {}
        self._early: dict[str, list[tuple[W.Notice, float]]] = {}
        self._pending_writes: dict[str, list[tuple[W.WriteRequest, float]]] = {}
        self._timers: list[tuple[float, int, str, str, object]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._results = TransferResults()
        self._stats: dict[str, Any] = {}
        #: producer (verify_checksums): what it serves on the side channel
        self._sums = C.ServedChecksums()
        #: consumer requests the engine aborted while loading (guarded by ``_lock``): their load
        #: is reported in ``finished_sending`` when it ends, never in ``finished_recving``
        self._aborting: set[str] = set()
        #: notices to send at the end of this round (see _notify)
        self._outbox: list[tuple[Peer, W.Notice]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Rounds run so far (the loop sleeps between rounds; tests check it does not spin).
        self.rounds = 0

    # -- other threads ----------------------------------------------------------------------
    def post(self, item: tuple) -> None:
        self._inbox.put(item)

    def abort_loads(self, request_ids: tuple[str, ...]) -> None:
        """Engine thread, at bind time (before this step's results are taken): a load that ended
        but was not yet reported is turned into ``finished_sending`` at once; the others are
        noted, and the progress thread reports them when their transfer ended."""
        with self._lock:
            for rid in request_ids:
                if rid in self._results.finished_recving:
                    self._results.finished_recving.discard(rid)
                    self._results.failed_recving.discard(rid)
                    self._results.finished_sending.add(rid)
                    self._stats["loads_aborted"] = self._stats.get("loads_aborted", 0) + 1
                else:
                    self._aborting.add(rid)

    def take_results(self) -> TransferResults:
        with self._lock:
            out, self._results = self._results, TransferResults()
            if self._stats:
                out.stats, self._stats = self._stats, {}
        return out

    def start(self) -> None:
        self._peers.prepare_self()
        self._thread = threading.Thread(target=self._run, name="kvconnect-pd-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout=10)
        for ld in self._loads.values():
            for h, _, _ in ld.handles:
                self._release(h)
        for ls in self._leases.values():
            for h, *_ in ls.writes:
                self._release(h)
        self._peers.close()

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = bool(self._loads or self._leases or self._pending_writes)
            self.rounds += 1
            try:
                item = self._inbox.get(timeout=self._cfg.poll_interval_s if busy else self._cfg.idle_poll_interval_s)
            except queue.Empty:
                item = None
            try:
                while item is not None:
                    if item[0] == "stop":
                        self._flush_notices()
                        return
                    self._handle(item)
                    item = self._inbox.get_nowait() if not self._inbox.empty() else None
                self._round()
            except Exception:  # a bug must not silently stop every transfer of this worker
                logger.exception("kvconnect P/D progress round failed")
            if self._outbox:
                self._flush_notices()

    def _round(self) -> None:
        now = time.monotonic()
        for sender, msg in self._t.notifications():
            self._on_notice(sender, msg, now)
        for rid in [r for r, ld in self._loads.items() if ld.handles and not ld.arrived]:
            self._poll_load(rid, now)
        for rid in [r for r, ls in self._leases.items() if ls.writes]:
            self._poll_writes(rid)
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, rid, obj = heapq.heappop(self._timers)
            self._expire(kind, rid, obj, now)

    def _timer(self, deadline: float, kind: str, rid: str, obj: object) -> None:
        heapq.heappush(self._timers, (deadline, next(self._seq), kind, rid, obj))

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "meta":
            meta: W.PDStepMetadata = item[1]
            for lease in meta.leases:
                self._on_lease(lease)
            for load in meta.loads:
                self._on_load_request(load)
            for rel in meta.releases:
                self._on_release_request(rel)
            for rid in meta.aborts:
                self._on_abort(rid)
        elif kind == "peer":
            self._peers.on_metadata(item[1], item[2], item[3])
        elif kind == "write":
            self._on_write_request(item[1])
        elif kind == "write_sent":
            self._on_write_sent(item[1], item[2], item[3], item[4])
        elif kind == "sums":
            self._on_sums(item[1], item[2], item[3], item[4])

    def _fetch(self, key: PeerKey, host: str, port: int) -> None:
        self._control.fetch_metadata(host, port, lambda md, err: self.post(("peer", key, md, err)))

    def _stat(self, key: str, value: float = 1) -> None:
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + value

    def _release(self, handle: Any) -> None:
        try:
            self._t.release(handle)
        except Exception:
            logger.debug("releasing a transfer handle failed", exc_info=True)

    def _notify(self, peer: Peer, notice: W.Notice) -> None:
        # Sent at the end of the round, after every transfer this round posts: a notice wakes the
        # peer, whose work would otherwise compete with this round's copies (measured on a 2-core
        # host: each read of a batch 15-25% slower).
        self._outbox.append((peer, notice))

    def _flush_notices(self) -> None:
        out, self._outbox = self._outbox, []
        for peer, notice in out:
            try:
                self._t.notify(peer.agent, W.encode_notice(notice))
            except KVConnectError as e:
                logger.warning("could not notify %s rank %d (%s): %s", *peer.key, notice.kind, e)

    def _mine(self, kind: str, rid: str) -> W.Notice:
        return W.Notice(kind, rid, self._me.tp_size, self._me.tp_rank)

    # -- consumer -------------------------------------------------------------------------------
    def _on_load_request(self, req: W.LoadRequest) -> None:
        try:
            spec = resolve_load(req, self._me.block_sizes, "pull" if self._cfg.pull else "push")
        except WireError as e:
            self._stat("loads_rejected")
            self._report_failed(req.request_id, req.local_block_ids, req.token_start, req.token_end, str(e))
            return
        self._on_load(spec)

    def _on_load(self, spec: W.LoadSpec) -> None:
        now = time.monotonic()
        me, r = self._me, spec.remote
        if spec.request_id in self._loads:
            logger.warning("request %s: a load is already in flight; ignoring the second", spec.request_id)
            return
        ld = _Load(spec, now + self._cfg.handshake_timeout_s + self._cfg.transfer_timeout_s, now)
        self._loads[spec.request_id] = ld
        self._timer(ld.deadline, "load", spec.request_id, ld)
        try:
            notify = P.producers_to_notify(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
            sources = P.source_ranks(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
        except LayoutError as e:
            self._fail_load(spec.request_id, f"producer TP {r.tp_size} cannot serve this rank: {e}")
            return
        ld.waiting = set(notify)
        if self._cfg.verify_checksums:
            ld.sums_wanted = set(sources)
            for p in sources:
                self._request_sums(ld, p)
        if spec.mode == "push":
            ld.awaiting = set(sources)
            body = W.WriteRequest(
                producer_request_id=spec.remote_request_id, consumer_request_id=spec.request_id,
                consumer_engine_id=me.engine_id, consumer_host=me.host, consumer_port=me.port,
                consumer_tp_size=me.tp_size, consumer_rank=me.tp_rank, block_ids=spec.local_block_ids,
                token_start=spec.token_start, token_end=spec.token_end,
            )
            data = encode(body)
            for p in notify:
                self._control.request(
                    r.host, r.port + p, "write", data,
                    lambda res, err, p=p, rid=spec.request_id, ld=ld: self.post(("write_sent", rid, ld, p, err)),
                )
            return
        for p in notify:
            self._peers.when_ready((r.engine_id, p), r.host, r.port + p,
                                   lambda peer, err, p=p, ld=ld: self._on_peer_for_load(ld, p, peer, err))

    def _on_write_sent(self, rid: str, ld: _Load, rank: int, err: KVConnectError | None) -> None:
        if self._loads.get(rid) is not ld:
            return
        if err is not None:
            if isinstance(err, PeerRefusedError):  # it will not write; after a timeout it still may
                ld.awaiting.discard(rank)
            self._fail_load(rid, f"producer rank {rank} refused the write request: {err}")
            return
        ld.waiting.discard(rank)
        self._maybe_finish_push(rid, ld)

    def _on_peer_for_load(self, ld: _Load, rank: int, peer: Peer | None, err: KVConnectError | None) -> None:
        rid = ld.spec.request_id
        if self._loads.get(rid) is not ld:
            return
        if err is not None:
            self._fail_load(rid, f"handshake with producer rank {rank}: {err}")
            return
        ld.waiting.discard(rank)
        if not ld.waiting:
            self._start_reads(ld)

    def _start_reads(self, ld: _Load) -> None:
        spec, r, me = ld.spec, ld.spec.remote, self._me
        rid = spec.request_id
        ranks = P.producers_to_notify(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
        for i, p in enumerate(ranks):
            peer = self._peers.get((r.engine_id, p))
            if peer is None or not peer.ready:
                self._fail_load(rid, f"producer rank {p} was forgotten during the handshake")
                self._done_unread(ld, ranks[i + 1:])
                return
            try:
                route = self._peers.route(peer, CONSUMER)
                if route.plan is None:
                    self._notify(peer, self._mine(W.DONE, spec.remote_request_id))
                    continue
                lidx, ridx = route.plan.indices(spec.local_block_ids, spec.remote_block_ids,
                                                spec.token_start, spec.token_end)
                if lidx.size == 0:
                    self._notify(peer, self._mine(W.DONE, spec.remote_request_id))
                    continue
                h = self._t.start(Op.READ, peer.agent, route.local, lidx, route.remote, ridx)
            except KVConnectError as e:
                self._fail_load(rid, f"cannot read from producer rank {p}: {e}")
                if isinstance(e, TransferError):  # dead or restarted: the next load handshakes afresh
                    self._peers.forget(peer.key)
                    self._done_unread(ld, ranks[i + 1:])
                else:  # e.g. block ids the producer does not have: its ranks are fine
                    self._done_unread(ld, ranks[i:])
                return
            ld.handles.append((h, peer, p))
            ld.nbytes += route.plan.nbytes(lidx)
            ld.ndescs += int(lidx.size)
        ld.started = time.monotonic()
        if not ld.handles:
            self._arrived(rid)
        else:
            self._poll_load(rid, ld.started)  # small reads are often done already

    def _done_unread(self, ld: _Load, ranks: tuple[int, ...]) -> None:
        """A failed load will not read from these producer ranks: they free its blocks now rather
        than when the lease expires (``_fail_load`` tells the ranks already read from)."""
        r = ld.spec.remote
        for q in ranks:
            peer = self._peers.get((r.engine_id, q))
            if peer is not None and peer.ready:
                self._notify(peer, self._mine(W.DONE, ld.spec.remote_request_id))

    def _poll_load(self, rid: str, now: float) -> None:
        ld = self._loads[rid]
        for h, peer, p in ld.handles:
            if p in ld.done_ranks:
                continue
            st = self._t.poll(h)
            if st is Status.DONE:
                ld.done_ranks.add(p)
            elif st is Status.FAILED:
                ld.done_ranks.add(p)  # settled: it moves no more bytes
                ld.failure = ld.failure or f"read from producer rank {p} failed"
                self._peers.forget(peer.key)
        if len(ld.done_ranks) == len(ld.handles):
            if ld.failure is not None:  # every status must succeed, whatever the order
                self._fail_load(rid, ld.failure)
            else:
                self._arrived(rid)

    def _maybe_finish_push(self, rid: str, ld: _Load) -> None:
        if ld.failure is not None:
            self._fail_load(rid, ld.failure)  # reported once no producer rank may still write
        elif not ld.waiting and not ld.awaiting:
            self._arrived(rid)

    def _arrived(self, rid: str) -> None:
        """Every byte of the load is in place: verify it (when asked to), then report it."""
        ld = self._loads[rid]
        ld.arrived = True
        if ld.sums_wanted:
            return  # _on_sums finishes it
        if self._cfg.verify_checksums:
            bad = C.load_mismatch(self._me, ld.spec, ld.sums)
            if bad is not None:
                self._stat("checksum_failures")
                self._fail_load(rid, bad)
                return
            self._stat("checksums_verified")
        self._succeed_load(rid)

    # -- integrity ------------------------------------------------------------------------------
    def _request_sums(self, ld: _Load, rank: int) -> None:
        r = ld.spec.remote
        body = encode(W.ChecksumRequest(request_id=ld.spec.remote_request_id))
        self._control.request(r.host, r.port + rank, "checksums", body,
                              lambda res, err: self.post(("sums", ld, rank, res, err)))

    def _on_sums(self, ld: _Load, rank: int, body: bytes | None, err: KVConnectError | None) -> None:
        rid = ld.spec.request_id
        if self._loads.get(rid) is not ld:
            return
        if err is not None:
            if C.NOT_READY in str(err):  # the producer has not bound the lease yet: ask again
                self._timer(time.monotonic() + _SUMS_RETRY_S, "sums", rid, (ld, rank))
                return
            self._fail_load(rid, f"cannot get the KV checksums from producer rank {rank}: {err}")
            return
        try:
            ld.sums[rank] = W.decode_checksum_reply(body or b"")
        except WireError as e:
            self._fail_load(rid, f"producer rank {rank}: {e}")
            return
        ld.sums_wanted.discard(rank)
        if ld.arrived and not ld.sums_wanted:
            self._arrived(rid)

    def _take_sums(self, spec: W.LeaseSpec) -> None:
        """Producer: checksums of a leased request's blocks, served until the lease ends."""
        try:
            self._sums.put(spec.request_id, C.lease_checksums(self._me, spec.block_ids))
        except (IndexError, RuntimeError, ValueError) as e:
            logger.warning("request %s: cannot take KV checksums: %s", spec.request_id, e)

    def _drop_sums(self, rid: str) -> None:
        data = self._sums.retire(rid)
        if data is not None:
            keep = self._cfg.handshake_timeout_s + self._cfg.transfer_timeout_s
            self._timer(time.monotonic() + keep, "old_sums", rid, data)

    def checksums_of(self, request_id: str) -> bytes:
        """The encoded checksums of a leased request (side-channel listener thread)."""
        return self._sums.get(request_id)

    def _succeed_load(self, rid: str) -> None:
        ld = self._loads.pop(rid)
        for h, peer, _ in ld.handles:
            self._release(h)
            self._notify(peer, self._mine(W.DONE, ld.spec.remote_request_id))
        with self._lock:
            if rid in self._aborting:
                self._aborting.discard(rid)
                self._results.finished_sending.add(rid)
                self._stats["loads_aborted"] = self._stats.get("loads_aborted", 0) + 1
            else:
                self._results.finished_recving.add(rid)
            s = self._stats
            s["loads_done"] = s.get("loads_done", 0) + 1
            s["bytes_received"] = s.get("bytes_received", 0) + ld.nbytes
            s["descriptors"] = s.get("descriptors", 0) + ld.ndescs
            took = time.monotonic() - ld.started
            s["transfer_s"] = s.get("transfer_s", 0) + took
            record_transfer(s, "load", took, ld.nbytes)

    @staticmethod
    def _in_flight(ld: _Load) -> bool:
        """Whether a transfer of the load may still write into its blocks: a posted read not yet
        ended (pull), or a producer rank that may be writing and has not said it ended (push)."""
        if ld.spec.mode == "push":
            return bool(ld.awaiting)
        return any(p not in ld.done_ranks for _, _, p in ld.handles)

    def _fail_load(self, rid: str, why: str, *, at_deadline: bool = False) -> None:
        """Fail the load once none of its transfers can still write into its blocks: the engine
        reuses blocks reported invalid, and a straggling read or write would corrupt their next
        owner. Until then the first reason is kept; the load's deadline ends the wait."""
        ld = self._loads.get(rid)
        if ld is None:
            return
        ld.failure = ld.failure or why
        if not at_deadline and self._in_flight(ld):
            return  # finished by _poll_load (pull) or the producers' notices (push)
        del self._loads[rid]
        why, spec = ld.failure, ld.spec
        # Tell the producer ranks we read from that we are done with their blocks.
        for h, peer, _ in ld.handles:
            self._release(h)
            self._notify(peer, self._mine(W.DONE, spec.remote_request_id))
        self._report_failed(rid, spec.local_block_ids, spec.token_start, spec.token_end, why)

    def _report_failed(self, rid: str, local_block_ids: W.Groups, token_start: int, token_end: int,
                       why: str) -> None:
        """Tell the engine a load failed: the blocks it was to fill are invalid (or, for a request
        the engine aborted meanwhile, free to take back)."""
        logger.warning("request %s: KV load failed, its blocks are invalid: %s", rid, why)
        invalid: set[int] = set()
        for g, ids in enumerate(local_block_ids):
            bs = self._me.block_sizes[g] if g < len(self._me.block_sizes) else self._me.block_sizes[0]
            invalid.update(ids[token_start // bs: -(-token_end // bs)])
        if len(local_block_ids) > 1:
            invalid.discard(0)
        with self._lock:
            if rid in self._aborting:  # nobody will use these blocks: let the engine free them
                self._aborting.discard(rid)
                self._results.finished_sending.add(rid)
                self._stats["loads_aborted"] = self._stats.get("loads_aborted", 0) + 1
            else:
                self._results.finished_recving.add(rid)
                self._results.failed_recving.add(rid)
                self._results.invalid_block_ids |= invalid
                self._results.failure_reasons[rid] = why
            self._stats["loads_failed"] = self._stats.get("loads_failed", 0) + 1

    def _on_abort(self, rid: str) -> None:
        """The abort of a consumer request reached the progress thread (after its load did)."""
        if rid in self._loads:
            return  # reported in finished_sending once the transfer ended
        with self._lock:  # no load in flight here: free at once (unless done at bind time)
            if rid in self._aborting:
                self._aborting.discard(rid)
                self._results.finished_sending.add(rid)

    def _on_release_request(self, req: W.ReleaseRequest) -> None:
        try:
            rel = resolve_release(req)
        except WireError as e:  # nobody to tell: the producer's lease frees its blocks
            logger.warning("request %s: cannot release the producer's blocks: %s", req.request_id, e)
            return
        self._on_release(rel)

    def _on_release(self, rel: W.ReleaseSpec) -> None:
        me, r = self._me, rel.remote
        self._stat("loads_released")  # the request will never load (aborted first, or all local)
        try:
            ranks = P.producers_to_notify(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
        except LayoutError as e:
            logger.warning("request %s: cannot release remote blocks: %s", rel.request_id, e)
            return
        for p in ranks:
            def cb(peer: Peer | None, err: KVConnectError | None, rel: W.ReleaseSpec = rel) -> None:
                if peer is not None:
                    self._notify(peer, self._mine(W.DONE, rel.remote_request_id))
            self._peers.when_ready((r.engine_id, p), r.host, r.port + p, cb)

    # -- producer -------------------------------------------------------------------------------
    def _on_lease(self, spec: W.LeaseSpec) -> None:
        now = time.monotonic()
        ls = _Lease(spec, now + self._cfg.lease_timeout_s)
        self._leases[spec.request_id] = ls
        self._timer(ls.deadline, "lease", spec.request_id, ls)
        if self._cfg.verify_checksums and self._me.layers:
            self._take_sums(spec)
        for notice, _ in self._early.pop(spec.request_id, []):
            self._lease_notice(ls, notice)
        for wr, _ in self._pending_writes.pop(spec.request_id, []):
            self._on_write_request(wr)
        self._maybe_free(spec.request_id)

    def _lease_notice(self, ls: _Lease, n: W.Notice) -> None:
        me = self._me
        if ls.expected is None:
            try:
                ls.expected = P.expected_consumers(me.num_heads, me.tp_size, me.tp_rank, n.tp_size, me.mla)
            except LayoutError as e:
                logger.warning("request %s: consumer TP %d does not fit: %s", ls.spec.request_id, n.tp_size, e)
                ls.expected = frozenset({n.rank})
        ls.got.add(n.rank)

    def _maybe_free(self, rid: str) -> None:
        ls = self._leases.get(rid)
        if ls is None or ls.expected is None or ls.writes or not ls.expected <= ls.got:
            return
        del self._leases[rid]
        self._drop_sums(rid)
        with self._lock:
            self._results.finished_sending.add(rid)
            if ls.failure is not None:
                self._results.failure_reasons[rid] = ls.failure
            self._stats["leases_done"] = self._stats.get("leases_done", 0) + 1

    def _on_write_request(self, wr: W.WriteRequest) -> None:
        rid = wr.producer_request_id
        ls = self._leases.get(rid)
        if ls is None:
            deadline = time.monotonic() + self._cfg.handshake_timeout_s
            self._pending_writes.setdefault(rid, []).append((wr, deadline))
            self._timer(deadline, "write", rid, wr)
            return
        key = (wr.consumer_engine_id, wr.consumer_rank)
        self._peers.when_ready(key, wr.consumer_host, wr.consumer_port,
                               lambda peer, err, ls=ls, wr=wr: self._start_write(ls, wr, peer, err))

    def _start_write(self, ls: _Lease, wr: W.WriteRequest, peer: Peer | None, err: KVConnectError | None) -> None:
        rid, me = ls.spec.request_id, self._me
        if self._leases.get(rid) is not ls:
            if peer is not None:
                self._notify(peer, W.Notice(W.FAILED, wr.consumer_request_id, me.tp_size, me.tp_rank))
            return
        n = W.Notice(W.DONE, rid, wr.consumer_tp_size, wr.consumer_rank)
        if err is not None:
            logger.warning("request %s: cannot reach consumer rank %d: %s", rid, wr.consumer_rank, err)
            ls.failure = ls.failure or f"cannot reach consumer rank {wr.consumer_rank}: {err}"
            self._lease_notice(ls, n)
            self._maybe_free(rid)
            return
        try:
            route = self._peers.route(peer, PRODUCER)
            if route.plan is None:
                lidx = None
            else:
                lidx, ridx = route.plan.indices(ls.spec.block_ids, wr.block_ids, wr.token_start, wr.token_end)
            if lidx is not None and lidx.size:
                h = self._t.start(Op.WRITE, peer.agent, route.local, lidx, route.remote, ridx,
                                  W.encode_notice(self._mine(W.WRITTEN, wr.consumer_request_id)))
                ls.writes.append((h, peer, wr.consumer_request_id, route.plan.nbytes(lidx)))
        except KVConnectError as e:
            logger.warning("request %s: write to consumer rank %d failed: %s", rid, wr.consumer_rank, e)
            ls.failure = ls.failure or f"write to consumer rank {wr.consumer_rank} failed: {e}"
            self._notify(peer, W.Notice(W.FAILED, wr.consumer_request_id, me.tp_size, me.tp_rank))
            if isinstance(e, TransferError):  # dead or restarted: the next write handshakes afresh
                self._peers.forget(peer.key)
        self._lease_notice(ls, n)
        self._maybe_free(rid)

    def _poll_writes(self, rid: str) -> None:
        ls = self._leases[rid]
        keep = []
        for w in ls.writes:
            h, peer, crid, nbytes = w
            st = self._t.poll(h)
            if st is Status.BUSY:
                keep.append(w)
                continue
            self._release(h)
            if st is Status.DONE:
                self._stat("bytes_sent", nbytes)
            else:
                self._stat("writes_failed")
                logger.warning("request %s: write to consumer %s rank %d failed", rid, *peer.key)
                ls.failure = ls.failure or f"write to consumer {peer.key[0]} rank {peer.key[1]} failed"
                self._notify(peer, self._mine(W.FAILED, crid))
                self._peers.forget(peer.key)
        ls.writes = keep
        self._maybe_free(rid)

    # -- notices and deadlines ------------------------------------------------------------------
    def _on_notice(self, sender: str, msg: bytes, now: float) -> None:
        try:
            n = W.decode_notice(msg)
        except WireError as e:
            logger.debug("ignoring a notification from %s: %s", sender, e)
            return
        if n.kind == W.DONE:
            ls = self._leases.get(n.request_id)
            if ls is None:
                self._early.setdefault(n.request_id, []).append((n, now))
                self._timer(now + self._cfg.lease_timeout_s, "early", n.request_id, None)
                return
            self._lease_notice(ls, n)
            self._maybe_free(n.request_id)
            return
        ld = self._loads.get(n.request_id)
        if ld is None or ld.spec.mode != "push":
            return
        if n.kind == W.FAILED:
            ld.awaiting.discard(n.rank)  # settled: it writes no more
            self._fail_load(n.request_id, f"producer rank {n.rank} could not write the blocks")
            return
        ld.awaiting.discard(n.rank)
        ld.done_ranks.add(n.rank)
        self._maybe_finish_push(n.request_id, ld)

    def _expire(self, kind: str, rid: str, obj: object, now: float) -> None:
        if kind == "load" and self._loads.get(rid) is obj:
            ld: _Load = obj  # type: ignore[assignment]
            stuck = [peer.key for _, peer, p in ld.handles if p not in ld.done_ranks]
            self._fail_load(rid, "deadline passed (transfer_timeout_s / handshake_timeout_s)", at_deadline=True)
            for key in stuck:  # a peer that stopped answering (or came back as another process)
                self._peers.forget(key)  # is handshaken afresh by the next load
        elif kind == "lease" and self._leases.get(rid) is obj:
            ls = self._leases.pop(rid)
            for h, *_ in ls.writes:
                self._release(h)
            self._drop_sums(rid)
            logger.warning("request %s: lease expired, freeing its blocks unread", rid)
            with self._lock:
                self._results.finished_sending.add(rid)
                self._results.failure_reasons[rid] = (
                    ls.failure or f"lease expired after lease_timeout_s={self._cfg.lease_timeout_s:g}s "
                    "before every consumer was served")
                self._stats["leases_expired"] = self._stats.get("leases_expired", 0) + 1
        elif kind == "sums":
            ld, rank = obj  # type: ignore[misc]
            if self._loads.get(rid) is ld:
                self._request_sums(ld, rank)
        elif kind == "old_sums":
            self._sums.forget(rid, obj)  # type: ignore[arg-type]
        elif kind == "early":
            kept = [(n, t) for n, t in self._early.get(rid, []) if t + self._cfg.lease_timeout_s > now]
            if kept:
                self._early[rid] = kept
            else:
                self._early.pop(rid, None)
        elif kind == "write":
            pend = self._pending_writes.get(rid, [])
            if any(wr is obj for wr, _ in pend):
                self._pending_writes[rid] = [(wr, t) for wr, t in pend if wr is not obj]
                if not self._pending_writes[rid]:
                    del self._pending_writes[rid]
                wr: W.WriteRequest = obj  # type: ignore[assignment]
                logger.warning("write request for unknown request %s from consumer rank %d refused",
                               rid, wr.consumer_rank)
                self._peers.when_ready(
                    (wr.consumer_engine_id, wr.consumer_rank), wr.consumer_host, wr.consumer_port,
                    lambda peer, err: peer and self._notify(peer, self._mine(W.FAILED, wr.consumer_request_id)),
                )


#: Pause before asking a producer again for checksums it does not hold yet.
_SUMS_RETRY_S = 0.005


def decode_write_request(body: bytes) -> W.WriteRequest:
    return decode(body, W.WriteRequest, what="write request")
