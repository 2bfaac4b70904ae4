"""kvconnect as a SGLang P/D transfer backend: ``--disaggregation-transfer-backend kvconnect``.

SGLang pushes: the decode rank allocates pages and tells the prefill rank where they are; the
prefill rank writes its pages there. SGLang's Common classes keep the control plane (bootstrap
server, rank mapping, ``KVPoll`` bookkeeping, failure records, abort and heartbeat handling); the
data plane is kvconnect's P/D core (:mod:`kvconnect.pd`, through :class:`.link.RankLink`), the same
one vLLM uses, over the transport the config names:

* a decode rank sends a ``ROOM`` message per request (its pages, metadata slot and P/D side
  channel, :mod:`.wire`);
* a prefill rank gathers the pages of each chunk :meth:`KVConnectKVSender.send` hands it; after the
  last chunk it leases them (one lease per decode rank: checksummed when ``verify_checksums``, held
  until written or ``lease_timeout_s``) and sends ``READY`` (lease id, page pairs, metadata rows);
* the decode rank then loads the lease with the core's push protocol (write request, write,
  ``written`` notice, checksum check) within ``handshake_timeout_s + transfer_timeout_s``.

``KVPoll`` on both sides: Bootstrapping -> WaitingForInput (decode pages known) -> Transferring ->
Success, or Failed with ``failure_exception()`` raising SGLang's ``KVTransferError`` whose reason
says why (peer gone, deadline, lease expired, checksum mismatch, incompatible pools, abort). The
decode rank's Success is its own load's (every byte arrived, and verified when asked), never the
prefill's word alone. Outcomes are drained from the core in ``check_status`` (what SGLang's
``poll`` calls).

Options come from ``KVCONNECT_SGLANG_CONFIG`` (:func:`.link.load_config`). Supported: KV pools
whose buffers have the same page bytes on both sides (so equal attention TP for MHA), no state
pools; anything else fails naming what differs.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import numpy as np
import zmq
from sglang.srt.disaggregation.base.conn import KVArgs, KVPoll
from sglang.srt.disaggregation.common.conn import (
    ABORT_TAG,
    AbortNotification,
    CommonKVBootstrapServer,
    CommonKVManager,
    CommonKVReceiver,
    CommonKVSender,
)
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.runtime_context import get_device
from sglang.srt.utils.network import NetworkAddress

from kvconnect.adapters.sglang import wire as W
from kvconnect.adapters.sglang.link import (
    CONFIG_ENV,
    RankLink,
    WorkerFactory,
    load_config,
    pool_layers,
    read_rows,
    write_rows,
)
from kvconnect.config import PDConfig
from kvconnect.errors import ConfigError, WireError

__all__ = ["CONFIG_ENV", "KVConnectKVManager", "load_config"]

logger = logging.getLogger(__name__)


class KVConnectKVManager(CommonKVManager):
    kv_status_msg_tag = W.STATUS_TAG
    kv_status_msg_carries_reason = True

    def __init__(
        self,
        args: KVArgs,
        disaggregation_mode: DisaggregationMode,
        server_args: Any,
        is_mla_backend: bool | None = False,
        *,
        config: PDConfig | None = None,
        worker_factory: WorkerFactory | None = None,
    ):
        states = [s for s in (getattr(args, "state_types", None) or [])]
        if states:
            raise ConfigError(
                "kvconnect's SGLang transfer backend moves full-attention KV pools only; this model "
                f"also needs state pools {[getattr(s, 'value', s) for s in states]} (use nixl or mooncake)"
            )
        self.cfg = config or load_config()
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        device = get_device().device
        where = "cpu" if device == "cpu" else f"{device}:{args.gpu_id}"
        signature = {
            "kv_item_lens": [int(n) for n in args.kv_item_lens],
            "page_size": int(args.page_size),
            "kv_cache_dtype": str(self.kv_cache_dtype_str or ""),
            "mla": bool(is_mla_backend),
        }
        engine_id = f"sgl-{disaggregation_mode.value}-{uuid.uuid4().hex[:12]}"
        buffers = pool_layers(args.kv_data_ptrs, args.kv_data_lens, args.kv_item_lens, where)
        self.link = RankLink(self.cfg, engine_id, int(args.engine_rank), buffers, signature, worker_factory)
        self._lock = threading.Lock()  # the room tables below: control thread and scheduler thread
        self._chunks: dict[int, list[tuple[np.ndarray, slice]]] = {}  # prefill: pages per chunk
        self._events: dict[int, list[Any]] = {}  # prefill: CUDA events to wait for before leasing
        self._leases: dict[str, int] = {}  # prefill: lease id -> room
        self._pending: dict[int, set[str]] = {}  # prefill: room -> leases not yet ended
        self._loading: set[int] = set()  # decode: rooms whose load is in flight
        self._announced: dict[int, np.ndarray] = {}  # decode: pages a room's KV may be written to
        self._stop = threading.Event()
        self._wake_addr = f"inproc://kvconnect-sgl-{id(self)}"
        self._wake_rx = self._zmq_ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._zmq_ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        if disaggregation_mode == DisaggregationMode.PREFILL:
            target = self._prefill_control
        else:
            target = self._decode_control
            self._heartbeat = self._start_heartbeat_checker_thread()
        self._control = threading.Thread(target=target, name="kvconnect-sgl-control", daemon=True)
        self._control.start()

    # -- outcomes from the P/D core (scheduler thread, through poll) -----------------------------------
    def check_status(self, bootstrap_room: int) -> KVPoll:
        self._drain()
        return super().check_status(bootstrap_room)

    def check_status_pp_consensus(self, bootstrap_room: int) -> KVPoll:
        self._drain()
        return super().check_status_pp_consensus(bootstrap_room)

    def _drain(self) -> None:
        r = self.link.take()
        if r.is_empty():
            return
        with self._lock:
            done = [(self._leases.pop(lid, None), lid) for lid in r.finished_sending]
            loads = [(int(rid), rid) for rid in r.finished_recving if int(rid) in self._loading]
            self._loading.difference_update(room for room, _ in loads)
        for room, lid in done:  # prefill: a lease ended; the room succeeds when all of its did
            if room is None or self.request_status.get(room) in (None, KVPoll.Failed):
                continue
            why = r.failure_reasons.get(lid)
            with self._lock:
                left = self._pending.get(room, set())
                left.discard(lid)
                finished = why is not None or not left
                if finished:
                    self._pending.pop(room, None)
            if why is not None:
                self._fail(room, f"kvconnect: {why}")
            elif finished:
                self.conclude_transfer(bootstrap_room=room, status=KVPoll.Success)
        for room, rid in loads:  # decode: the load ended
            if room not in self.request_status:
                continue  # cleared meanwhile: a failure record would outlive it
            if rid in r.failed_recving:
                self._fail_decode(room, f"kvconnect: {r.failure_reasons.get(rid, 'KV load failed')}")
            else:
                self.update_status(room, KVPoll.Success)

    # -- decode side ------------------------------------------------------------------------------------
    def build_receiver_registration_message(self) -> list[bytes]:
        return list(W.HELLO)

    def build_receiver_metadata_message(
        self,
        *,
        bootstrap_room,
        required_dst_info_num,
        kv_indices,
        aux_index,
        state_indices,
        decode_prefix_len,
        is_dummy,
        device_kv_indices=None,
    ) -> list[bytes]:
        if state_indices and any(s is not None and len(s) for s in state_indices):
            raise ConfigError("kvconnect's SGLang transfer backend does not move state pools")
        if not is_dummy:
            with self._lock:
                self._announced[int(bootstrap_room)] = np.asarray(kv_indices, dtype=np.int64).copy()
        req = self.link.room_request(
            int(bootstrap_room),
            self.local_ip,
            self.rank_port,
            None if is_dummy else kv_indices,
            aux_index,
            int(required_dst_info_num),
            int(decode_prefix_len or 0),
        )
        return W.frames(W.KIND_ROOM, req)

    def _decode_control(self) -> None:
        for msg in self._messages():
            if self.handle_abort_ack_message(msg):
                continue
            if W.is_ours(msg):
                try:
                    obj = W.parse(msg)
                    if not isinstance(obj, W.Ready):
                        raise WireError("a decode rank takes READY messages only")
                    self._on_ready(obj)
                except WireError as e:
                    logger.warning("kvconnect decode: dropping a message: %s", e)
                continue
            parsed = self.parse_kv_status_message(msg)
            if parsed is None:
                logger.warning("kvconnect decode: dropping an unexpected message (%d frames)", len(msg))
                continue
            room, status, prefill_rank, reason = parsed
            if status != KVPoll.Success:  # Success is this rank's own load's to say
                self.apply_prefill_status(
                    bootstrap_room=room, status=status, prefill_rank=prefill_rank, failure_reason=reason
                )

    def _on_ready(self, ready: W.Ready) -> None:
        room = ready.room
        if self.request_status.get(room) not in (KVPoll.WaitingForInput, KVPoll.Transferring):
            logger.warning("kvconnect decode: READY for room %s, which is not waiting for KV", room)
            return
        try:
            if ready.aux_index is not None and ready.aux_rows:
                a = self.kv_args
                write_rows(a.aux_data_ptrs, a.aux_data_lens, a.aux_item_lens, ready.aux_index, ready.aux_rows)
        except WireError as e:
            self._fail_decode(room, f"kvconnect: prefill's metadata rows do not fit: {e}")
            return
        src, dst = W.unpack_pages(ready.src_pages, "READY"), W.unpack_pages(ready.dst_pages, "READY")
        with self._lock:
            announced = self._announced.pop(room, np.zeros(0, np.int64))
        if not np.isin(dst, announced).all():
            self._fail_decode(room, "kvconnect: prefill named pages this request did not announce")
            return
        if not len(dst):
            self.update_status(room, KVPoll.Success)
            return
        with self._lock:
            twice = room in self._loading
            self._loading.add(room)
        if twice:
            self._fail_decode(room, "kvconnect: two prefill ranks wrote one room (unsupported rank mapping)")
            return
        self.update_status(room, KVPoll.Transferring)
        self.link.load(str(room), ready, src, dst)

    def _fail_decode(self, room: int, reason: str) -> None:
        self.record_failure(room, reason)
        self.update_status(room, KVPoll.Failed)

    # -- prefill side -----------------------------------------------------------------------------------
    def _prefill_control(self) -> None:
        for msg in self._messages():
            if msg and msg[0] == ABORT_TAG:
                self._on_abort(msg)
                continue
            if not W.is_ours(msg) or msg == W.HELLO:
                if msg != W.HELLO:
                    logger.warning("kvconnect prefill: dropping foreign traffic (%d frames)", len(msg))
                continue
            try:
                obj = W.parse(msg)
                if not isinstance(obj, W.RoomRequest):
                    raise WireError("a prefill rank takes ROOM messages only")
                obj.pages()
            except WireError as e:
                logger.warning("kvconnect prefill: %s", e)
                continue
            self._on_room(obj)

    def _on_room(self, req: W.RoomRequest) -> None:
        infos = self.transfer_infos.setdefault(req.room, {})
        infos[req.agent_name] = req
        if len(infos) == req.required_dst_info_num:
            self.resolve_kv_replica_factor(infos)
            self.req_to_decode_prefix_len[req.room] = next(
                (i.decode_prefix_len for i in infos.values() if i.decode_prefix_len), 0
            )
            self.update_status(req.room, KVPoll.WaitingForInput)

    def resolve_kv_replica_factor(self, transfer_infos) -> None:
        if self._kv_replica_factor is None:
            self._kv_replica_factor = max(1, len(transfer_infos))

    def _on_abort(self, msg: list[bytes]) -> None:
        note = AbortNotification.from_zmq(msg)
        if note is None:
            return
        room = note.room
        if room in self.request_status and self.request_status.get(room) != KVPoll.Success:
            self._fail(room, "Aborted by the decode instance")

    def add_transfer_request(
        self,
        bootstrap_room,
        kv_indices,
        index_slice,
        is_last_chunk,
        aux_index=None,
        state_indices=None,
        num_kv_tokens=None,
        *,
        wait_event=None,
        indices_event=None,
        trace_ctx=None,
    ):
        """Scheduler thread: note one chunk's pages; after the last, lease them and send READY."""
        assert self.disaggregation_mode == DisaggregationMode.PREFILL
        room = int(bootstrap_room)
        with self._lock:
            self._chunks.setdefault(room, []).append(
                (np.asarray(kv_indices, dtype=np.int64).copy(), index_slice)
            )
            self._events.setdefault(room, []).extend(e for e in (wait_event, indices_event) if e is not None)
        if is_last_chunk:
            self._lease_room(room, aux_index)

    def _lease_room(self, room: int, aux_index: int | None) -> None:
        with self._lock:
            chunks, events = self._chunks.pop(room, []), self._events.pop(room, [])
        for ev in events:  # the forward passes that wrote these pages ended (they have, by now)
            if hasattr(ev, "synchronize"):
                ev.synchronize()
        infos = self.transfer_infos.get(room)
        if not infos or self.request_status.get(room) in (None, KVPoll.Failed):
            return  # cleared or failed meanwhile
        src = np.concatenate([p for p, _ in chunks]) if chunks else np.zeros(0, np.int64)
        a = self.kv_args
        rows = () if aux_index is None else read_rows(a.aux_data_ptrs, a.aux_item_lens, aux_index)
        readies = []
        for agent, req in list(infos.items()):
            if req.is_dummy:
                continue
            dst = np.concatenate([req.pages()[s] for _, s in chunks]) if chunks else np.zeros(0, np.int64)
            if len(dst) != len(src):
                self._fail(
                    room, f"decode rank {agent} announced {len(dst)} pages for {len(src)} prefill pages"
                )
                return
            readies.append((req, W.lease_id(room, agent), dst))
        self.update_status(room, KVPoll.Transferring)
        with self._lock:
            self._pending[room] = {lid for _, lid, _ in readies if len(src)}
            self._leases.update({lid: room for _, lid, _ in readies if len(src)})
        for req, lid, dst in readies:
            if len(src):
                self.link.lease(lid, src)
            ready = self.link.ready(
                room, lid, src, dst, req.aux_index, rows if req.aux_index is not None else ()
            )
            na = NetworkAddress(req.endpoint, req.dst_port)
            try:
                self._send_multipart_locked(na.to_tcp(), W.frames(W.KIND_READY, ready), is_ipv6=na.is_ipv6)
            except Exception as e:
                self._fail(
                    room,
                    f"kvconnect: could not tell decode rank {na.to_host_port_str()} its KV is ready: {e}",
                )
                return
        if not len(src):
            with self._lock:
                self._pending.pop(room, None)
            self.conclude_transfer(bootstrap_room=room, status=KVPoll.Success)

    def forget_room(self, room: int) -> None:
        """The sender or receiver cleared ``room``; drop what it left (a lease or load still ends
        by itself)."""
        with self._lock:
            self._chunks.pop(room, None)
            self._events.pop(room, None)
            self._pending.pop(room, None)
            self._announced.pop(room, None)

    def _fail(self, room: int, reason: str) -> None:
        logger.warning("kvconnect prefill: room %s failed: %s", room, reason)
        self.conclude_failure(bootstrap_room=room, failure_reason=reason)

    # -- shared ---------------------------------------------------------------------------------------
    def _messages(self):
        """Multipart messages from the rank's ZMQ socket until :meth:`close` (blocks on sockets)."""
        poller = zmq.Poller()
        poller.register(self.server_socket, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll())
            if self._wake_rx in events or self._stop.is_set():
                return
            try:
                yield self.server_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            except Exception:
                logger.exception("kvconnect control thread: receive failed")

    def close(self) -> None:
        """Stop the threads and release the transport (tests, role switch)."""
        self._stop.set()
        if getattr(self, "_heartbeat_shutdown", None) is not None:
            self._heartbeat_shutdown.set()
        try:
            self._wake_tx.send(b"")
        except zmq.ZMQError:
            pass
        self._control.join(timeout=5)
        self.link.close()

    def teardown(self) -> None:
        self.close()


class KVConnectKVSender(CommonKVSender):
    """SGLang's sender state machine; ``send`` hands chunks to the manager."""

    def clear(self) -> None:
        super().clear()
        self.kv_mgr.forget_room(int(self.bootstrap_room))


class KVConnectKVReceiver(CommonKVReceiver):
    """SGLang's receiver state machine; the manager loads the request's KV once prefill says READY."""

    def clear(self) -> None:
        super().clear()
        self.kv_mgr.forget_room(int(self.bootstrap_room))


class KVConnectKVBootstrapServer(CommonKVBootstrapServer):
    """SGLang's HTTP bootstrap registry, unchanged."""
