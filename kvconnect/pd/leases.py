"""The producer's leases and writes (progress thread).

A finished request's blocks are held (leased) until every expected consumer rank said ``done``
(pull) or was written (push), or until the lease expires; then they are reported in
``finished_sending``. A ``done`` notice or a write request may arrive before the lease (the
engine thread is slower than the network): it is kept until the lease comes, for a while.
With ``verify_checksums`` the checksums of a request's blocks are taken when it is leased and
served on the side channel (:mod:`kvconnect.pd.checksums`) until a while after the lease ended.
"""

from __future__ import annotations

import logging
import time

from kvconnect.errors import KVConnectError, LayoutError, TransferError
from kvconnect.pd import checksums as C
from kvconnect.pd import plan as P
from kvconnect.pd import wire as W
from kvconnect.pd.messages import EarlyNoticesExpire, LeaseDeadline, PendingWriteExpire, ServedSumsExpire
from kvconnect.pd.peers import PRODUCER, Peer
from kvconnect.pd.state import Lease, Shared
from kvconnect.pd.transport import Op, Status

logger = logging.getLogger(__name__)


class Leases:
    def __init__(self, shared: Shared) -> None:
        self._s = shared
        self._t = shared.transport
        self._me = shared.me
        self._cfg = shared.cfg
        self._peers = shared.peers
        self._out = shared.outcomes
        #: leases held, by producer request id
        self.active: dict[str, Lease] = {}
        #: ``done`` notices that came before their lease, with when they came
        self.early: dict[str, list[tuple[W.Notice, float]]] = {}
        #: write requests that came before their lease, with their deadline
        self.pending_writes: dict[str, list[tuple[W.WriteRequest, float]]] = {}
        #: verify_checksums: what is served on the side channel
        self.served = C.ServedChecksums()

    def holds_work(self) -> bool:
        return bool(self.active or self.pending_writes)

    # -- requests ---------------------------------------------------------------------------------
    def on_lease(self, spec: W.LeaseSpec) -> None:
        now = time.monotonic()
        ls = Lease(spec, now + self._cfg.lease_timeout_s)
        self.active[spec.request_id] = ls
        self._s.events.at(ls.deadline, LeaseDeadline(ls))
        if self._cfg.verify_checksums and self._me.layers:
            self._take_sums(spec)
        for notice, _ in self.early.pop(spec.request_id, []):
            self._consumer_done(ls, notice)
        for wr, _ in self.pending_writes.pop(spec.request_id, []):
            self.on_write_request(wr)
        self._maybe_free(spec.request_id)

    def on_done_notice(self, n: W.Notice, now: float) -> None:
        """A consumer rank is done with a leased request's blocks (pull, or push not written)."""
        ls = self.active.get(n.request_id)
        if ls is None:
            self.early.setdefault(n.request_id, []).append((n, now))
            self._s.events.at(now + self._cfg.lease_timeout_s, EarlyNoticesExpire(n.request_id))
            return
        self._consumer_done(ls, n)
        self._maybe_free(n.request_id)

    def on_write_request(self, wr: W.WriteRequest) -> None:
        rid = wr.producer_request_id
        ls = self.active.get(rid)
        if ls is None:
            deadline = time.monotonic() + self._cfg.handshake_timeout_s
            self.pending_writes.setdefault(rid, []).append((wr, deadline))
            self._s.events.at(deadline, PendingWriteExpire(wr))
            return
        key = (wr.consumer_engine_id, wr.consumer_rank)
        self._peers.when_ready(key, wr.consumer_host, wr.consumer_port,
                               lambda peer, err: self._start_write(ls, wr, peer, err))

    def checksums_of(self, request_id: str) -> bytes:
        """The encoded checksums of a leased request (side-channel listener thread)."""
        return self.served.get(request_id)

    # -- writes (push) ------------------------------------------------------------------------------
    def _start_write(self, ls: Lease, wr: W.WriteRequest, peer: Peer | None,
                     err: KVConnectError | None) -> None:
        rid, me, s = ls.spec.request_id, self._me, self._s
        if self.active.get(rid) is not ls:
            if peer is not None:
                s.notify(peer, W.Notice(W.FAILED, wr.consumer_request_id, me.tp_size, me.tp_rank))
            return
        n = W.Notice(W.DONE, rid, wr.consumer_tp_size, wr.consumer_rank)
        if err is not None or peer is None:
            logger.warning("request %s: cannot reach consumer rank %d: %s", rid, wr.consumer_rank, err)
            ls.failure = ls.failure or f"cannot reach consumer rank {wr.consumer_rank}: {err}"
            self._consumer_done(ls, n)
            self._maybe_free(rid)
            return
        try:
            route = self._peers.route(peer, PRODUCER)
            if route.plan is not None:
                lidx, ridx = route.plan.indices(ls.spec.block_ids, wr.block_ids, wr.token_start, wr.token_end)
                if lidx.size:
                    h = self._t.start(Op.WRITE, peer.agent, route.local, lidx, route.remote, ridx,
                                      W.encode_notice(s.mine(W.WRITTEN, wr.consumer_request_id)))
                    ls.writes.append((h, peer, wr.consumer_request_id, route.plan.nbytes(lidx)))
        except KVConnectError as e:
            logger.warning("request %s: write to consumer rank %d failed: %s", rid, wr.consumer_rank, e)
            ls.failure = ls.failure or f"write to consumer rank {wr.consumer_rank} failed: {e}"
            s.notify(peer, W.Notice(W.FAILED, wr.consumer_request_id, me.tp_size, me.tp_rank))
            if isinstance(e, TransferError):  # dead or restarted: the next write handshakes afresh
                self._peers.forget(peer.key)
        self._consumer_done(ls, n)
        self._maybe_free(rid)

    def poll(self) -> None:
        """Poll every posted write."""
        for rid in [r for r, ls in self.active.items() if ls.writes]:
            self._poll_writes(rid)

    def _poll_writes(self, rid: str) -> None:
        ls, s = self.active[rid], self._s
        keep = []
        for w in ls.writes:
            h, peer, crid, nbytes = w
            st = self._t.poll(h)
            if st is Status.BUSY:
                keep.append(w)
                continue
            s.release(h)
            if st is Status.DONE:
                with self._out.counting() as c:
                    c.bytes_sent += nbytes
            else:
                with self._out.counting() as c:
                    c.writes_failed += 1
                logger.warning("request %s: write to consumer %s rank %d failed", rid, *peer.key)
                ls.failure = ls.failure or f"write to consumer {peer.key[0]} rank {peer.key[1]} failed"
                s.notify(peer, s.mine(W.FAILED, crid))
                self._peers.forget(peer.key)
        ls.writes = keep
        self._maybe_free(rid)

    # -- the end of a lease ---------------------------------------------------------------------------
    def _consumer_done(self, ls: Lease, n: W.Notice) -> None:
        me = self._me
        if ls.expected is None:
            try:
                ls.expected = P.expected_consumers(me.num_heads, me.tp_size, me.tp_rank, n.tp_size, me.mla)
            except LayoutError as e:
                logger.warning("request %s: consumer TP %d does not fit: %s",
                               ls.spec.request_id, n.tp_size, e)
                ls.expected = frozenset({n.rank})
        ls.got.add(n.rank)

    def _maybe_free(self, rid: str) -> None:
        ls = self.active.get(rid)
        if ls is None or ls.expected is None or ls.writes or not ls.expected <= ls.got:
            return
        del self.active[rid]
        self._drop_sums(rid)
        self._out.lease_ended(rid, expired=False, failure=ls.failure)

    def release_all(self) -> None:
        """Shutdown: release every posted write."""
        for ls in self.active.values():
            for h, *_ in ls.writes:
                self._s.release(h)

    # -- checksums ----------------------------------------------------------------------------------
    def _take_sums(self, spec: W.LeaseSpec) -> None:
        try:
            self.served.put(spec.request_id, C.lease_checksums(self._me, spec.block_ids))
        except (IndexError, RuntimeError, ValueError) as e:
            logger.warning("request %s: cannot take KV checksums: %s", spec.request_id, e)

    def _drop_sums(self, rid: str) -> None:
        data = self.served.retire(rid)
        if data is not None:  # still served a while: a consumer may ask after the lease ended
            keep = self._cfg.handshake_timeout_s + self._cfg.transfer_timeout_s
            self._s.events.at(time.monotonic() + keep, ServedSumsExpire(rid, data))

    # -- timers -------------------------------------------------------------------------------------
    def on_deadline(self, t: LeaseDeadline, now: float) -> None:
        rid = t.lease.spec.request_id
        if self.active.get(rid) is not t.lease:
            return
        ls = self.active.pop(rid)
        for h, *_ in ls.writes:
            self._s.release(h)
        self._drop_sums(rid)
        logger.warning("request %s: lease expired, freeing its blocks unread", rid)
        why = (f"lease expired after lease_timeout_s={self._cfg.lease_timeout_s:g}s "
               "before every consumer was served")
        self._out.lease_ended(rid, expired=True, failure=ls.failure or why)

    def on_early_expire(self, t: EarlyNoticesExpire, now: float) -> None:
        rid = t.request_id
        kept = [(n, at) for n, at in self.early.get(rid, []) if at + self._cfg.lease_timeout_s > now]
        if kept:
            self.early[rid] = kept
        else:
            self.early.pop(rid, None)

    def on_pending_write_expire(self, t: PendingWriteExpire, now: float) -> None:
        wr, s = t.request, self._s
        rid = wr.producer_request_id
        pend = self.pending_writes.get(rid, [])
        if not any(w is wr for w, _ in pend):
            return  # its lease came
        rest = [(w, at) for w, at in pend if w is not wr]
        if rest:
            self.pending_writes[rid] = rest
        else:
            del self.pending_writes[rid]
        logger.warning("write request for unknown request %s from consumer rank %d refused",
                       rid, wr.consumer_rank)

        def refuse(peer: Peer | None, err: KVConnectError | None) -> None:
            if peer is not None:
                s.notify(peer, s.mine(W.FAILED, wr.consumer_request_id))

        key = (wr.consumer_engine_id, wr.consumer_rank)
        self._peers.when_ready(key, wr.consumer_host, wr.consumer_port, refuse)

    def on_served_sums_expire(self, t: ServedSumsExpire, now: float) -> None:
        self.served.forget(t.request_id, t.data)
