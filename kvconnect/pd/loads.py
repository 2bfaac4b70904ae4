"""The consumer's load machine (progress thread): from a load request to its report.

pull
    handshake with the producer ranks involved, READ from each source rank, then tell every
    producer rank ``done`` (the producer frees when it arrives). The notice is sent after the read
    rather than attached to it: an attached notification makes the read's completion wait for the
    producer's next progress round, a latency on every request.
push
    send a write request to each producer rank over the side channel; wait for a ``written``
    notice from every source rank.
checksums (``verify_checksums``)
    ask every source rank for its checksums when the load starts (beside the handshake and the
    transfer); once the bytes arrived compute ours and compare before reporting. A mismatch fails.

A load succeeds only when every transfer (or notice) it waits for arrived; any failure or the
deadline fails it: its local blocks are reported invalid, once none of its transfers can still
write into them (:meth:`Loads.fail`). A load whose request the engine aborted runs to its end (a
READ in flight may still write into the blocks); it is then reported in ``finished_sending``.
"""

from __future__ import annotations

import logging
import time
from functools import partial

from kvconnect.errors import KVConnectError, LayoutError, PeerRefusedError, TransferError, WireError
from kvconnect.metadata import encode
from kvconnect.pd import checksums as C
from kvconnect.pd import plan as P
from kvconnect.pd import wire as W
from kvconnect.pd.messages import LoadDeadline, SumsAnswer, SumsRetry, WriteSent
from kvconnect.pd.params import resolve_load, resolve_release
from kvconnect.pd.peers import CONSUMER, Peer
from kvconnect.pd.state import Load, Shared
from kvconnect.pd.transport import Op, Status

logger = logging.getLogger(__name__)

#: Pause before asking a producer again for checksums it does not hold yet.
SUMS_RETRY_S = 0.005


class Loads:
    def __init__(self, shared: Shared) -> None:
        self._s = shared
        self._t = shared.transport
        self._me = shared.me
        self._cfg = shared.cfg
        self._peers = shared.peers
        self._out = shared.outcomes
        #: loads in flight, by consumer request id
        self.active: dict[str, Load] = {}

    # -- requests from the engine -----------------------------------------------------------------
    def on_request(self, req: W.LoadRequest) -> None:
        try:
            spec = resolve_load(req, self._me.block_sizes, "pull" if self._cfg.pull else "push")
        except WireError as e:
            with self._out.counting() as c:
                c.loads_rejected += 1
            self._report_failed(req.request_id, req.local_block_ids, req.token_start, req.token_end, str(e))
            return
        self.start(spec)

    def start(self, spec: W.LoadSpec) -> None:
        now = time.monotonic()
        me, r, s = self._me, spec.remote, self._s
        if spec.request_id in self.active:
            logger.warning("request %s: a load is already in flight; ignoring the second", spec.request_id)
            return
        ld = Load(spec, now + self._cfg.handshake_timeout_s + self._cfg.transfer_timeout_s, now)
        self.active[spec.request_id] = ld
        s.events.at(ld.deadline, LoadDeadline(ld))
        try:
            notify = P.producers_to_notify(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
            sources = P.source_ranks(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
        except LayoutError as e:
            self.fail(spec.request_id, f"producer TP {r.tp_size} cannot serve this rank: {e}")
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
                s.control.request(r.host, r.port + p, "write", data, partial(self._post_write_sent, ld, p))
            return
        for p in notify:
            self._peers.when_ready((r.engine_id, p), r.host, r.port + p, partial(self._on_peer, ld, p))

    def on_abort(self, rid: str) -> None:
        """The abort of a consumer request reached the progress thread (after its load did)."""
        if rid not in self.active:  # else reported in finished_sending once the transfer ended
            self._out.abort_without_load(rid)

    def on_release_request(self, req: W.ReleaseRequest) -> None:
        """The request will never load (aborted first, or all local): free the producer's blocks."""
        try:
            rel = resolve_release(req)
        except WireError as e:  # nobody to tell: the producer's lease frees its blocks
            logger.warning("request %s: cannot release the producer's blocks: %s", req.request_id, e)
            return
        me, r, s = self._me, rel.remote, self._s
        with self._out.counting() as c:
            c.loads_released += 1
        try:
            ranks = P.producers_to_notify(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
        except LayoutError as e:
            logger.warning("request %s: cannot release remote blocks: %s", rel.request_id, e)
            return
        for p in ranks:
            def cb(peer: Peer | None, err: KVConnectError | None, rel: W.ReleaseSpec = rel) -> None:
                if peer is not None:
                    s.notify(peer, s.mine(W.DONE, rel.remote_request_id))
            self._peers.when_ready((r.engine_id, p), r.host, r.port + p, cb)

    # -- progress ---------------------------------------------------------------------------------
    def _post_write_sent(self, ld: Load, rank: int, answer: object, err: KVConnectError | None) -> None:
        """Control thread: producer ``rank`` answered ``ld``'s write request."""
        self._s.events.post(WriteSent(ld, rank, err))

    def on_write_sent(self, m: WriteSent) -> None:
        ld, rank, err = m.load, m.rank, m.error
        rid = ld.spec.request_id
        if self.active.get(rid) is not ld:
            return
        if err is not None:
            if isinstance(err, PeerRefusedError):  # it will not write; after a timeout it still may
                ld.awaiting.discard(rank)
            self.fail(rid, f"producer rank {rank} refused the write request: {err}")
            return
        ld.waiting.discard(rank)
        self._maybe_finish_push(rid, ld)

    def on_producer_notice(self, n: W.Notice) -> None:
        """``written`` / ``failed`` from a producer rank (push)."""
        ld = self.active.get(n.request_id)
        if ld is None or ld.spec.mode != "push":
            return
        ld.awaiting.discard(n.rank)  # settled either way: it writes no more
        if n.kind == W.FAILED:
            self.fail(n.request_id, f"producer rank {n.rank} could not write the blocks")
            return
        ld.done_ranks.add(n.rank)
        self._maybe_finish_push(n.request_id, ld)

    def poll(self, now: float) -> None:
        """Poll every posted read (pull) not yet ended."""
        for rid in [r for r, ld in self.active.items() if ld.handles and not ld.arrived]:
            self._poll_reads(rid, now)

    def on_deadline(self, t: LoadDeadline, now: float) -> None:
        ld = t.load
        rid = ld.spec.request_id
        if self.active.get(rid) is not ld:
            return
        stuck = [peer.key for _, peer, p in ld.handles if p not in ld.done_ranks]
        self.fail(rid, "deadline passed (transfer_timeout_s / handshake_timeout_s)", at_deadline=True)
        for key in stuck:  # a peer that stopped answering (or came back as another process)
            self._peers.forget(key)  # is handshaken afresh by the next load

    def release_all(self) -> None:
        """Shutdown: release every posted read."""
        for ld in self.active.values():
            for h, _, _ in ld.handles:
                self._s.release(h)

    # -- pull ---------------------------------------------------------------------------------------
    def _on_peer(self, ld: Load, rank: int, peer: Peer | None, err: KVConnectError | None) -> None:
        rid = ld.spec.request_id
        if self.active.get(rid) is not ld:
            return
        if err is not None:
            self.fail(rid, f"handshake with producer rank {rank}: {err}")
            return
        ld.waiting.discard(rank)
        if not ld.waiting:
            self._start_reads(ld)

    def _start_reads(self, ld: Load) -> None:
        spec, r, me, s = ld.spec, ld.spec.remote, self._me, self._s
        rid = spec.request_id
        ranks = P.producers_to_notify(me.num_heads, me.tp_size, me.tp_rank, r.tp_size, me.mla)
        for i, p in enumerate(ranks):
            peer = self._peers.get((r.engine_id, p))
            if peer is None or not peer.ready:
                self.fail(rid, f"producer rank {p} was forgotten during the handshake")
                self._done_unread(ld, ranks[i + 1:])
                return
            try:
                route = self._peers.route(peer, CONSUMER)
                if route.plan is None:
                    s.notify(peer, s.mine(W.DONE, spec.remote_request_id))
                    continue
                lidx, ridx = route.plan.indices(spec.local_block_ids, spec.remote_block_ids,
                                                spec.token_start, spec.token_end)
                if lidx.size == 0:
                    s.notify(peer, s.mine(W.DONE, spec.remote_request_id))
                    continue
                h = self._t.start(Op.READ, peer.agent, route.local, lidx, route.remote, ridx)
            except KVConnectError as e:
                self.fail(rid, f"cannot read from producer rank {p}: {e}")
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
            self._poll_reads(rid, ld.started)  # small reads are often done already

    def _done_unread(self, ld: Load, ranks: tuple[int, ...]) -> None:
        """A failed load will not read from these producer ranks: they free its blocks now rather
        than when the lease expires (``fail`` tells the ranks already read from)."""
        r, s = ld.spec.remote, self._s
        for q in ranks:
            peer = self._peers.get((r.engine_id, q))
            if peer is not None and peer.ready:
                s.notify(peer, s.mine(W.DONE, ld.spec.remote_request_id))

    def _poll_reads(self, rid: str, now: float) -> None:
        ld = self.active[rid]
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
                self.fail(rid, ld.failure)
            else:
                self._arrived(rid)

    # -- push ---------------------------------------------------------------------------------------
    def _maybe_finish_push(self, rid: str, ld: Load) -> None:
        if ld.failure is not None:
            self.fail(rid, ld.failure)  # reported once no producer rank may still write
        elif not ld.waiting and not ld.awaiting:
            self._arrived(rid)

    # -- checksums ----------------------------------------------------------------------------------
    def _request_sums(self, ld: Load, rank: int) -> None:
        r, s = ld.spec.remote, self._s
        body = encode(W.ChecksumRequest(request_id=ld.spec.remote_request_id))
        s.control.request(r.host, r.port + rank, "checksums", body,
                          lambda res, err: s.events.post(SumsAnswer(ld, rank, res, err)))

    def on_sums(self, m: SumsAnswer) -> None:
        ld, rank, err = m.load, m.rank, m.error
        rid = ld.spec.request_id
        if self.active.get(rid) is not ld:
            return
        if err is not None:
            if C.NOT_READY in str(err):  # the producer has not bound the lease yet: ask again
                self._s.events.at(time.monotonic() + SUMS_RETRY_S, SumsRetry(ld, rank))
                return
            self.fail(rid, f"cannot get the KV checksums from producer rank {rank}: {err}")
            return
        try:
            ld.sums[rank] = W.decode_checksum_reply(m.body or b"")
        except WireError as e:
            self.fail(rid, f"producer rank {rank}: {e}")
            return
        ld.sums_wanted.discard(rank)
        if ld.arrived and not ld.sums_wanted:
            self._arrived(rid)

    def on_sums_retry(self, t: SumsRetry, now: float) -> None:
        if self.active.get(t.load.spec.request_id) is t.load:
            self._request_sums(t.load, t.rank)

    # -- the end of a load --------------------------------------------------------------------------
    def _arrived(self, rid: str) -> None:
        """Every byte of the load is in place: verify it (when asked to), then report it."""
        ld = self.active[rid]
        ld.arrived = True
        if ld.sums_wanted:
            return  # on_sums finishes it
        if self._cfg.verify_checksums:
            bad = C.load_mismatch(self._me, ld.spec, ld.sums)
            if bad is not None:
                with self._out.counting() as c:
                    c.checksum_failures += 1
                self.fail(rid, bad)
                return
            with self._out.counting() as c:
                c.checksums_verified += 1
        self._succeed(rid)

    def _succeed(self, rid: str) -> None:
        ld, s = self.active.pop(rid), self._s
        for h, peer, _ in ld.handles:
            s.release(h)
            s.notify(peer, s.mine(W.DONE, ld.spec.remote_request_id))
        self._out.load_succeeded(rid, ld.nbytes, ld.ndescs, time.monotonic() - ld.started)

    @staticmethod
    def _in_flight(ld: Load) -> bool:
        """Whether a transfer of the load may still write into its blocks: a posted read not yet
        ended (pull), or a producer rank that may be writing and has not said it ended (push)."""
        if ld.spec.mode == "push":
            return bool(ld.awaiting)
        return any(p not in ld.done_ranks for _, _, p in ld.handles)

    def fail(self, rid: str, why: str, *, at_deadline: bool = False) -> None:
        """Fail the load once none of its transfers can still write into its blocks: the engine
        reuses blocks reported invalid, and a straggling read or write would corrupt their next
        owner. Until then the first reason is kept; the load's deadline ends the wait."""
        ld = self.active.get(rid)
        if ld is None:
            return
        ld.failure = ld.failure or why
        if not at_deadline and self._in_flight(ld):
            return  # finished by _poll_reads (pull) or the producers' notices (push)
        del self.active[rid]
        why, spec, s = ld.failure, ld.spec, self._s
        # Tell the producer ranks we read from that we are done with their blocks.
        for h, peer, _ in ld.handles:
            s.release(h)
            s.notify(peer, s.mine(W.DONE, spec.remote_request_id))
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
        self._out.load_failed(rid, invalid, why)
