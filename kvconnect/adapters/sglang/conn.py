"""kvconnect as a SGLang P/D transfer backend: ``--disaggregation-transfer-backend kvconnect``.

SGLang pushes: the decode rank allocates pages and tells the prefill rank where they are; the
prefill rank writes its pages there and reports the outcome. SGLang's Common classes keep the
control plane (bootstrap server, rank mapping, ``KVPoll`` bookkeeping, failure records, abort
and heartbeat handling); kvconnect adds the data plane:

* the rank's KV buffers are registered once with kvconnect's NIXL transport
  (:class:`kvconnect.backends.nixl.NixlTransport`), owned by one :class:`~.push.PushLoop` thread;
* a decode rank sends a ``REG`` message (transport metadata, buffers, page geometry) once per
  prefill rank and a ``ROOM`` message (page indices, metadata slot) per request (:mod:`.wire`);
* a prefill rank turns each chunk SGLang hands to :meth:`KVConnectKVSender.send` into one write per
  decode rank (merged page runs, :mod:`.plan`), polled against ``transfer_timeout_s``; after the
  last chunk's writes it sends the request's metadata row (first token, logprobs) and then the
  terminal status on the same ordered ZMQ socket.

``KVPoll`` on both sides: Bootstrapping -> WaitingForInput (decode pages known) -> Transferring ->
Success, or Failed with ``failure_exception()`` raising SGLang's ``KVTransferError`` whose reason
names the cause (peer gone, deadline, incompatible pools, abort).

Options come from ``KVCONNECT_SGLANG_CONFIG`` (kvconnect's JSON config, one ``nixl`` backend;
SGLang has no per-backend config flag); every key defaults (see ``kvconnect config``).
Supported: full-attention KV pools (MHA, MLA), equal attention TP for MHA (MLA any), no pipeline
parallelism split. Anything else fails at registration with a message saying what differs.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
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

from kvconnect.adapters.sglang import plan
from kvconnect.adapters.sglang import wire as W
from kvconnect.adapters.sglang.push import PushLoop
from kvconnect.config import NixlConfig, parse_config
from kvconnect.errors import ConfigError, KVConnectError, WireError
from kvconnect.metadata import decode, encode

logger = logging.getLogger(__name__)

#: Environment variable holding kvconnect's JSON config for the SGLang transfer backend.
CONFIG_ENV = "KVCONNECT_SGLANG_CONFIG"
_AUX = b"AUX"


def load_config(raw: str | None = None) -> NixlConfig:
    """The NIXL backend options from ``KVCONNECT_SGLANG_CONFIG`` (defaults when unset)."""
    raw = os.environ.get(CONFIG_ENV) if raw is None else raw
    try:
        data = json.loads(raw) if raw else {"backend": "nixl"}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{CONFIG_ENV} is not valid JSON: {e}") from e
    if isinstance(data, dict) and "backend" not in data and "backends" not in data:
        data = {"backend": "nixl", **data}
    cfg = parse_config(data)
    if len(cfg.backends) != 1 or not isinstance(cfg.backends[0], NixlConfig):
        raise ConfigError(
            f"{CONFIG_ENV}: the SGLang transfer backend takes one 'nixl' backend, got {cfg.names}; "
            "SGLang's host tier is configured through --hicache-storage-backend instead"
        )
    return cfg.backends[0]


def make_transport(cfg: NixlConfig, agent_name: str):
    from kvconnect.backends.nixl import NixlTransport

    return NixlTransport(
        agent_name,
        backends=cfg.nixl_backends,
        progress_thread=cfg.nixl_progress_thread,
        merge_runs=cfg.merge_runs,
    )


class AuxRows(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One request's metadata rows (first output token, logprobs, ...), prefill to decode."""

    room: int
    aux_index: int
    rows: tuple[bytes, ...]


@dataclass(slots=True)
class _Peer:
    reg: W.PeerRegistration
    handle: str | None = None
    error: str | None = None
    waiting: list = field(default_factory=list)


@dataclass(slots=True)
class _Room:
    pending: int = 0
    last_seen: bool = False
    failed: bool = False
    aux_index: int | None = None


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
        transport: Any = None,
        config: NixlConfig | None = None,
    ):
        states = [s for s in (getattr(args, "state_types", None) or [])]
        if states:
            raise ValueError(
                "kvconnect's SGLang transfer backend moves full-attention KV pools only; this model "
                f"also needs state pools {[getattr(s, 'value', s) for s in states]} (use nixl or mooncake)"
            )
        self.cfg = config or load_config()
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        self.kv_num_pages = plan.num_pages(args.kv_data_lens, args.kv_item_lens)
        self.agent_name = f"kvconnect-sgl-{disaggregation_mode.value}-{uuid.uuid4().hex[:12]}"
        self.transport = transport if transport is not None else make_transport(self.cfg, self.agent_name)
        self.agent_name = self.transport.agent_name
        device = get_device().device
        where = "cpu" if device == "cpu" else f"{device}:{args.gpu_id}"
        self.transport.register(list(zip(args.kv_data_ptrs, args.kv_data_lens)), where)
        self._stop = threading.Event()
        self._wake_addr = f"inproc://kvconnect-sgl-{id(self)}"
        self._wake_rx = self._zmq_ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._zmq_ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._awaiting: set[int] = set()  # decode: rooms whose pages were announced
        self._awaiting_lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}  # loop thread only
        self._rooms: dict[int, _Room] = {}  # loop thread only
        if disaggregation_mode == DisaggregationMode.PREFILL:
            self.push = PushLoop(self.transport, poll_interval_s=self.cfg.poll_interval_s, timeout_s=self.cfg.transfer_timeout_s)
            target = self._prefill_control
        else:
            self.push = PushLoop(
                self.transport,
                poll_interval_s=self.cfg.poll_interval_s,
                timeout_s=self.cfg.transfer_timeout_s,
                target_active=self._decode_waiting,
            )
            target = self._decode_control
            self._heartbeat = self._start_heartbeat_checker_thread()
        self._control = threading.Thread(target=target, name="kvconnect-sgl-control", daemon=True)
        self._control.start()

    # -- decode side: what a receiver sends ---------------------------------------------------------
    def build_receiver_registration_message(self) -> list[bytes]:
        a = self.kv_args
        reg = W.PeerRegistration(
            version=W.WIRE_VERSION,
            agent_name=self.agent_name,
            endpoint=self.local_ip,
            port=self.rank_port,
            transport=self.transport.name,
            transport_metadata=self.transport.metadata(),
            kv_regions=tuple(zip(map(int, a.kv_data_ptrs), map(int, a.kv_data_lens))),
            kv_item_lens=tuple(map(int, a.kv_item_lens)),
            aux_regions=tuple(zip(map(int, a.aux_data_ptrs), map(int, a.aux_data_lens))),
            aux_item_lens=tuple(map(int, a.aux_item_lens)),
            page_size=int(a.page_size),
            attn_tp_size=int(self.attn_tp_size),
            engine_rank=int(a.engine_rank),
            is_mla=bool(self.is_mla_backend),
            kv_cache_dtype=str(self.kv_cache_dtype_str or ""),
        )
        return W.frames(W.KIND_REGISTER, reg)

    def build_receiver_metadata_message(
        self, *, bootstrap_room, required_dst_info_num, kv_indices, aux_index, state_indices,
        decode_prefix_len, is_dummy, device_kv_indices=None,
    ) -> list[bytes]:
        if state_indices and any(s is not None and len(s) for s in state_indices):
            raise ValueError("kvconnect's SGLang transfer backend does not move state pools")
        req = W.RoomRequest(
            room=int(bootstrap_room),
            agent_name=self.agent_name,
            endpoint=self.local_ip,
            dst_port=self.rank_port,
            kv_pages=b"" if is_dummy else W.pack_pages(kv_indices),
            aux_index=None if aux_index is None else int(aux_index),
            required_dst_info_num=int(required_dst_info_num),
            decode_prefix_len=int(decode_prefix_len or 0),
            is_dummy=bool(is_dummy),
        )
        return W.frames(W.KIND_ROOM, req)

    def expect_writes(self, room: int) -> None:
        """Decode: ``room``'s pages were announced; progress the engine until it ends."""
        with self._awaiting_lock:
            self._awaiting.add(int(room))
        self.push.wake()

    def _decode_waiting(self) -> bool:
        """Loop thread, each round: does an announced request still wait for writes?"""
        with self._awaiting_lock:
            for room in list(self._awaiting):
                if self.request_status.get(room) not in (KVPoll.WaitingForInput, KVPoll.Transferring):
                    self._awaiting.discard(room)  # ended or cleared
            return bool(self._awaiting)

    def _decode_control(self) -> None:
        for msg in self._messages():
            if self.handle_abort_ack_message(msg):
                continue
            if len(msg) == 3 and msg[0] == W.MAGIC and msg[1] == _AUX:
                self._on_aux(msg[2])
                continue
            parsed = self.parse_kv_status_message(msg)
            if parsed is None:
                logger.warning("kvconnect decode: dropping an unexpected message (%d frames)", len(msg))
                continue
            room, status, prefill_rank, reason = parsed
            self.apply_prefill_status(bootstrap_room=room, status=status, prefill_rank=prefill_rank, failure_reason=reason)

    def _on_aux(self, body: bytes) -> None:
        try:
            aux = decode(body, AuxRows, what="kvconnect metadata rows")
            a = self.kv_args
            if len(aux.rows) > len(a.aux_item_lens):
                raise WireError(f"{len(aux.rows)} metadata rows for {len(a.aux_item_lens)} buffers")
            for ptr, dlen, ilen, row in zip(a.aux_data_ptrs, a.aux_data_lens, a.aux_item_lens, aux.rows):
                if len(row) != ilen or not 0 <= aux.aux_index * ilen < dlen:
                    raise WireError(f"metadata row of {len(row)} bytes at slot {aux.aux_index} does not fit")
                ctypes.memmove(int(ptr) + aux.aux_index * int(ilen), row, len(row))
        except WireError as e:
            logger.warning("kvconnect decode: dropping metadata rows: %s", e)

    # -- prefill side ---------------------------------------------------------------------------------
    def _prefill_control(self) -> None:
        for msg in self._messages():
            if msg and msg[0] == ABORT_TAG:
                self._on_abort(msg)
                continue
            if not W.is_ours(msg):
                logger.warning("kvconnect prefill: dropping foreign traffic (%d frames)", len(msg))
                continue
            try:
                obj = W.parse(msg)
            except WireError as e:
                logger.warning("kvconnect prefill: %s", e)
                continue
            if isinstance(obj, W.PeerRegistration):
                self.push.call(lambda reg=obj: self._load_peer(reg))
            else:
                self._on_room(obj)

    def _on_room(self, req: W.RoomRequest) -> None:
        try:
            req.pages()
        except WireError as e:
            logger.warning("kvconnect prefill: %s", e)
            return
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
        if room in self.request_status and self.check_status(room) != KVPoll.Success:
            self.record_failure(room, "Aborted by the decode instance")
            self.update_status(room, KVPoll.Failed)

    def _load_peer(self, reg: W.PeerRegistration) -> None:
        """Loop thread: check the decode rank's pool against ours, then load its transport."""
        a = self.kv_args
        why = plan.pool_mismatch(
            local_item_lens=a.kv_item_lens, remote_item_lens=reg.kv_item_lens,
            local_page_size=a.page_size, remote_page_size=reg.page_size,
            local_tp=self.attn_tp_size, remote_tp=reg.attn_tp_size, is_mla=bool(self.is_mla_backend),
            local_dtype=str(self.kv_cache_dtype_str or ""), remote_dtype=reg.kv_cache_dtype,
        )
        if reg.transport != self.transport.name:
            why = f"decode uses transport {reg.transport!r}, prefill {self.transport.name!r}"
        old = self._peers.get(reg.agent_name)
        peer = self._peers[reg.agent_name] = _Peer(reg, error=why, waiting=old.waiting if old else [])
        if why:
            logger.error("kvconnect prefill: decode rank %s cannot be written: %s", reg.agent_name, why)
            self._flush_waiting(peer)
            return

        def loaded(handle: str | None, err: str | None) -> None:
            peer.handle, peer.error = handle, err
            self._flush_waiting(peer)

        self.push.add_peer(reg.transport_metadata, reg.kv_regions, loaded)

    @staticmethod
    def _flush_waiting(peer: _Peer) -> None:
        waiting, peer.waiting = peer.waiting, []
        for fn in waiting:
            fn()

    def add_transfer_request(
        self, bootstrap_room, kv_indices, index_slice, is_last_chunk, aux_index=None,
        state_indices=None, num_kv_tokens=None, *, wait_event=None, indices_event=None, trace_ctx=None,
    ):
        assert self.disaggregation_mode == DisaggregationMode.PREFILL
        room, last = int(bootstrap_room), bool(is_last_chunk)
        if indices_event is None:  # the page list is final now: copy it off the caller's buffer
            kv_indices = np.asarray(kv_indices, dtype=np.int64).copy()

        def chunk() -> None:
            # Off the scheduler thread: wait until the forward pass that wrote these pages (and
            # the copy that filled the page list) finished before reading either.
            for ev in (indices_event, wait_event):
                if ev is not None and hasattr(ev, "synchronize"):
                    ev.synchronize()
            pages = np.asarray(kv_indices, dtype=np.int64).copy()
            self._on_chunk(room, pages, index_slice, last, aux_index)

        self.push.call(chunk)

    def _on_chunk(self, room: int, pages: np.ndarray, index_slice: slice, last: bool, aux_index) -> None:
        """Loop thread: one chunk of one request, written to every decode rank that wants it."""
        infos = self.transfer_infos.get(room)
        if not infos or self.request_status.get(room) in (None, KVPoll.Failed):
            st = self._rooms.get(room)
            if st is not None and not st.pending:
                del self._rooms[room]  # cleared or failed meanwhile: forget it
            return
        st = self._rooms.setdefault(room, _Room())
        if st.failed:
            return
        self.update_status(room, KVPoll.Transferring)
        if last:
            st.last_seen, st.aux_index = True, aux_index
        for agent, req in list(infos.items()):
            if req.is_dummy:
                continue
            peer = self._peers.get(agent)
            if peer is None:
                self._fail(room, f"decode rank {agent} asked for KV before registering its memory")
                return
            if peer.handle is None and peer.error is None:  # still loading: write once it is
                st.pending += 1
                peer.waiting.append(lambda r=req, a=agent: self._after_peer(room, r, a, pages, index_slice))
                continue
            self._write(room, req, peer, pages, index_slice)
        self._maybe_conclude(room)

    def _after_peer(self, room: int, req: W.RoomRequest, agent: str, pages, index_slice) -> None:
        st = self._rooms.get(room)
        if st is None:
            return
        st.pending -= 1
        self._write(room, req, self._peers[agent], pages, index_slice)
        self._maybe_conclude(room)

    def _write(self, room: int, req: W.RoomRequest, peer: _Peer, pages: np.ndarray, index_slice: slice) -> None:
        st = self._rooms[room]
        if st.failed:
            return
        if peer.error is not None or peer.handle is None:
            self._fail(room, f"decode rank {req.agent_name} cannot be written: {peer.error}")
            return
        dst = req.pages()[index_slice]
        try:
            local, remote = plan.write_descs(pages, dst, self.kv_args.kv_item_lens, self.kv_num_pages,
                                             plan.num_pages([n for _, n in peer.reg.kv_regions], peer.reg.kv_item_lens))
        except KVConnectError as e:
            self._fail(room, f"pages of room {room} do not fit decode rank {req.agent_name}: {e}")
            return
        st.pending += 1

        def done(err: str | None) -> None:
            st.pending -= 1
            if err is not None:
                self._fail(room, f"kvconnect: {err}")
            self._maybe_conclude(room)

        self.push.write(peer.handle, local, remote, done)

    def _maybe_conclude(self, room: int) -> None:
        st = self._rooms.get(room)
        if st is None or st.pending or not (st.last_seen or st.failed):
            return
        del self._rooms[room]
        if st.failed:
            return
        infos = self.transfer_infos.get(room) or {}
        if st.aux_index is not None:
            a = self.kv_args
            rows = tuple(
                ctypes.string_at(int(p) + int(st.aux_index) * int(n), int(n))
                for p, n in zip(a.aux_data_ptrs, a.aux_item_lens)
            )
            for req in infos.values():
                if req.is_dummy or req.aux_index is None:
                    continue
                body = encode(AuxRows(room=room, aux_index=req.aux_index, rows=rows))
                na = NetworkAddress(req.endpoint, req.dst_port)
                try:
                    self._send_multipart_locked(na.to_tcp(), [W.MAGIC, _AUX, body], is_ipv6=na.is_ipv6)
                except Exception as e:
                    self._fail(room, f"could not send metadata rows to {na.to_host_port_str()}: {e}")
                    return
        self.conclude_transfer(bootstrap_room=room, status=KVPoll.Success)

    def _fail(self, room: int, reason: str) -> None:
        st = self._rooms.get(room)
        if st is not None:
            if st.failed:
                return
            st.failed = True
        logger.warning("kvconnect prefill: room %s failed: %s", room, reason)
        self.conclude_failure(bootstrap_room=room, failure_reason=reason)
        self._maybe_conclude(room)

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
        self.push.close()

    def teardown(self) -> None:
        self.close()


class KVConnectKVSender(CommonKVSender):
    """SGLang's sender state machine; ``send`` hands chunks to the manager's push loop."""


class KVConnectKVReceiver(CommonKVReceiver):
    """SGLang's receiver state machine; once its pages are announced the decode rank's transfer
    engine is progressed until the request ends."""

    def send_metadata(self, kv_indices, aux_index=None, state_indices=None, decode_prefix_len=None, **kw):
        super().send_metadata(kv_indices, aux_index, state_indices, decode_prefix_len, **kw)
        self.kv_mgr.expect_writes(self.bootstrap_room)


class KVConnectKVBootstrapServer(CommonKVBootstrapServer):
    """SGLang's HTTP bootstrap registry, unchanged."""
