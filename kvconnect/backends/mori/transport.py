""":class:`MoriTransport`: the P/D :class:`~kvconnect.pd.transport.Transport` over one MoRI-IO
``IOEngine`` (``mori.io``, ROCm/mori).

Mapping onto MoRI-IO:

* one ``IOEngine`` per worker, keyed ``<agent name>-<uuid>``: MoRI caches QPs per remote key and
  never rebuilds them, so a restarted process must come back under a new key;
* ``create_backend(RDMA, RdmaBackendConfig(...))`` in the constructor -- before any
  ``register_memory`` / ``register_remote_engine``, which MoRI forgets when no backend exists;
* each region is one ``register_memory``; the handshake blob carries ``EngineDesc.pack()``, every
  region's ``MemoryDesc.pack()`` and the notification mailbox address. A peer's blob is validated
  field by field (``unpack`` accepts short arrays and fills defaults);
* a transfer is one engine-level ``batch_read`` / ``batch_write`` with one entry (and one uid)
  per region pair, rows merged where contiguous on both sides (:mod:`.runs`);
* :meth:`poll` reads each status with ``Code()`` -- one non-blocking progress step, present in
  every MoRI version (``WaitFor`` / ``wait_all`` exist only from v1.2.0; ``Wait()`` blocks forever
  on a stuck transfer and is never called). A transfer is DONE only when **every** status
  succeeded; a status still ``INIT`` after submission was never posted (the batch stopped early)
  and counts as failed. A failed transfer is reported once none of its statuses is still in
  flight, so no RDMA of it can land after the engine was told; every transfer has its own
  deadline (``transfer_timeout_s``), so a hung status still ends;
* errors arrive three ways -- a raised ``RuntimeError`` (first contact: peer unreachable, remote
  memory unknown), a status failed before the call returns, or a status that fails later; the
  first becomes a handle that polls FAILED (so the P/D core forgets the peer and the next request
  handshakes afresh), the others are read from the statuses;
* notifications go through :class:`.mailbox.Mailbox` (see there for why not MoRI's own).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import msgspec
import numpy as np

from kvconnect.errors import HandshakeError, TransferError, WireError
from kvconnect.metadata import decode, encode
from kvconnect.pd.transport import Op, Region, Status, Transport

from .mailbox import Mailbox
from .runs import MAX_REQUEST_BYTES, batch_entries

logger = logging.getLogger(__name__)

#: MoRI ``StatusCode`` values (pybind enums compare unequal to ints; ``int()`` them).
SUCCESS, INIT, IN_PROGRESS, ERR_BEGIN = 0, 1, 2, 10


class MoriBlob(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A MoRI transport's handshake metadata."""

    engine: bytes
    memory: list[bytes]
    mailbox_host: str
    mailbox_port: int


@dataclass(slots=True)
class _Peer:
    desc: Any
    memory: list[Any]
    mailbox: tuple[str, int]


@dataclass(slots=True)
class _Prepared:
    peer: str | None
    memory: list[Any]
    region: np.ndarray
    offset: np.ndarray
    size: np.ndarray


@dataclass(slots=True, eq=False)
class _Handle:
    op: Op
    peer: str
    statuses: list[Any]
    deadline: float
    notify: bytes | None = None
    pending: list[int] = field(default_factory=list)
    error: str = ""
    result: Status | None = None


def _code(status: Any) -> int:
    """One progress step of a status; None (never returned by MoRI) reads as never posted."""
    return INIT if status is None else int(status.Code())


class MoriTransport(Transport):
    name = "mori"

    def __init__(
        self,
        agent_name: str,
        mori: ModuleType,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        qp_per_transfer: int = 1,
        post_batch_size: int = -1,
        num_worker_threads: int = 1,
        poll_cq_mode: str = "polling",
        transfer_timeout_s: float = 60.0,
        merge_runs: bool = True,
        secret: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self._m = mori
        self._key = f"{agent_name}-{uuid.uuid4().hex[:12]}"
        self._timeout = float(transfer_timeout_s)
        self._merge = merge_runs
        self._max_bytes = int(max_request_bytes)
        try:
            self._engine = mori.IOEngine(self._key, mori.IOEngineConfig(host, int(port)))
            mode = mori.PollCqMode.EVENT if poll_cq_mode == "event" else mori.PollCqMode.POLLING
            # Positional: v0.1.0 knows only these five. Notification off: see mailbox.py.
            rdma = mori.RdmaBackendConfig(int(qp_per_transfer), int(post_batch_size), int(num_worker_threads),
                                          mode, False)
            self._engine.create_backend(mori.BackendType.RDMA, rdma)
        except Exception as e:
            raise TransferError(f"MoRI-IO engine {self._key} on {host}:{port} could not start: "
                                f"{type(e).__name__}: {e}") from e
        self._mailbox = Mailbox(host, secret)
        self._loc = mori.MemoryLocationType.CPU
        self._dev = -1
        self._local: list[Any] = []
        self._local_sizes: list[int] = []
        self._peers: dict[str, _Peer] = {}

    # -- identity and memory ----------------------------------------------------------------------
    @property
    def agent_name(self) -> str:
        return self._key

    @property
    def engine(self) -> Any:
        return self._engine

    def register(self, regions: Sequence[Region], device: str = "cpu") -> None:
        if device.startswith("cuda"):
            self._loc, self._dev = self._m.MemoryLocationType.GPU, int(device.partition(":")[2] or 0)
        mds = []
        try:
            for addr, nbytes in regions:
                mds.append(self._engine.register_memory(int(addr), int(nbytes), self._dev, self._loc))
        except Exception as e:
            for md in mds:
                self._deregister(md)
            raise TransferError(f"MoRI-IO could not register {len(regions)} KV regions ({device}): "
                                f"{type(e).__name__}: {e}") from e
        self._local = mds
        self._local_sizes = [int(n) for _, n in regions]

    def metadata(self) -> bytes:
        return encode(MoriBlob(
            engine=bytes(self._engine.get_engine_desc().pack()),
            memory=[bytes(md.pack()) for md in self._local],
            mailbox_host=self._mailbox.host, mailbox_port=self._mailbox.port,
        ))

    # -- peers --------------------------------------------------------------------------------------
    def add_peer(self, metadata: bytes, regions: Sequence[Region]) -> str:
        try:
            blob = decode(metadata, MoriBlob, what="MoRI transport metadata")
        except WireError as e:
            raise HandshakeError(str(e)) from e
        desc = self._unpack(self._m.EngineDesc, blob.engine, "engine descriptor")
        key = desc.key
        if not isinstance(key, str) or not key:
            raise HandshakeError("MoRI transport metadata: engine descriptor has no key")
        if not desc.host or not 0 < int(desc.port) < 65536:
            raise HandshakeError(
                f"MoRI engine {key}: descriptor has no RDMA address ({desc.host!r}:{desc.port})"
            )
        if not blob.mailbox_host or not 0 < blob.mailbox_port < 65536:
            raise HandshakeError(f"MoRI engine {key}: bad notification address "
                                 f"{blob.mailbox_host!r}:{blob.mailbox_port}")
        if len(blob.memory) != len(regions):
            raise HandshakeError(f"MoRI engine {key} describes {len(blob.memory)} memory regions, "
                                 f"its KV layout has {len(regions)}")
        memory = []
        for i, (raw, (addr, nbytes)) in enumerate(zip(blob.memory, regions)):
            md = self._unpack(self._m.MemoryDesc, raw, f"memory descriptor {i}")
            if (
                md.engine_key != key
                or int(md.data) != int(addr)
                or int(md.size) != int(nbytes)
                or not md.size
            ):
                raise HandshakeError(
                    f"MoRI engine {key}: memory descriptor {i} (engine {md.engine_key!r}, {md.size} bytes at "
                    f"{int(md.data):#x}) does not match KV region {i} ({nbytes} bytes at {int(addr):#x})"
                )
            memory.append(md)
        try:
            self._engine.register_remote_engine(desc)
        except Exception as e:
            raise HandshakeError(f"MoRI-IO refused engine {key}: {type(e).__name__}: {e}") from e
        old = self._peers.get(key)
        if old is not None and old.mailbox != (blob.mailbox_host, blob.mailbox_port):
            self._mailbox.forget(*old.mailbox)
        self._peers[key] = _Peer(desc, memory, (blob.mailbox_host, blob.mailbox_port))
        return key

    def _unpack(self, cls: Any, raw: bytes, what: str) -> Any:
        try:
            return cls.unpack(raw)
        except Exception as e:
            raise HandshakeError(f"MoRI transport metadata: bad {what}: {type(e).__name__}: {e}") from e

    def remove_peer(self, peer: str) -> None:
        p = self._peers.pop(peer, None)
        if p is None:
            return
        self._mailbox.forget(*p.mailbox)
        try:
            self._engine.deregister_remote_engine(p.desc)
        except Exception:
            logger.debug("deregistering MoRI engine %s failed", peer, exc_info=True)

    # -- descriptors ----------------------------------------------------------------------------------
    def prepare(self, peer: str | None, descs: np.ndarray) -> Any:
        if peer is None:
            memory, sizes = self._local, self._local_sizes
        else:
            p = self._peers.get(peer)
            if p is None:
                raise TransferError(f"MoRI peer {peer!r} is not loaded")
            memory, sizes = p.memory, [int(md.size) for md in p.memory]
        d = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
        region, offset, size = d[:, 0].copy(), d[:, 1].copy(), d[:, 2].copy()
        if d.size:
            if int(region.min()) < 0 or int(region.max()) >= len(memory):
                raise TransferError(
                    f"descriptor names a region outside the {len(memory)} of {peer or 'local'}"
                )
            ends = offset + size
            if (
                int(offset.min()) < 0
                or int(size.min()) < 0
                or (ends > np.asarray(sizes, np.int64)[region]).any()
            ):
                raise TransferError(f"descriptor outside its registered region ({peer or 'local'})")
        return _Prepared(peer, memory, region, offset, size)

    def release_prepared(self, prepared: Any) -> None:
        return None

    # -- transfers --------------------------------------------------------------------------------------
    def start(self, op: Op, peer: str, local: Any, local_idx: np.ndarray, remote: Any,
              remote_idx: np.ndarray, notify: bytes | None = None) -> Any:
        if peer not in self._peers or remote.peer != peer:
            raise TransferError(f"MoRI peer {peer!r} is not loaded")
        lidx, ridx = np.asarray(local_idx), np.asarray(remote_idx)
        if lidx.shape != ridx.shape:
            raise TransferError(f"{lidx.size} local descriptors paired with {ridx.size} remote ones")
        size = local.size[lidx]
        if not np.array_equal(size, remote.size[ridx]):
            raise TransferError("paired local and remote descriptors differ in length")
        entries = batch_entries(local.region[lidx], local.offset[lidx], remote.region[ridx],
                                remote.offset[ridx], size, self._merge, self._max_bytes)
        h = _Handle(op, peer, [], time.monotonic() + self._timeout, notify)
        if not entries:
            return h
        eng = self._engine
        try:
            uids = [eng.allocate_transfer_uid() for _ in entries]
            submit = eng.batch_read if op is Op.READ else eng.batch_write
            statuses = submit(
                [local.memory[e.local] for e in entries], [e.local_offsets for e in entries],
                [remote.memory[e.remote] for e in entries], [e.remote_offsets for e in entries],
                [e.sizes for e in entries], uids,
            )
        except Exception as e:  # first contact: peer unreachable, remote memory unknown
            h.error = f"{op.value} could not be posted: {type(e).__name__}: {e}"
            return h
        statuses = list(statuses or [])
        statuses += [None] * (len(entries) - len(statuses))  # a status never returned was never posted
        h.statuses = statuses
        h.pending = list(range(len(statuses)))
        return h

    def poll(self, handle: Any) -> Status:
        h: _Handle = handle
        if h.result is not None:
            return h.result
        try:
            still = []
            for i in h.pending:
                c = _code(h.statuses[i])
                if c == SUCCESS:
                    continue
                if c == IN_PROGRESS:
                    still.append(i)
                elif not h.error:  # INIT (never posted) or an error code: final
                    msg = h.statuses[i].Message() if h.statuses[i] is not None else "not returned"
                    h.error = f"status {i + 1}/{len(h.statuses)} ended with code {c}: {msg or 'never posted'}"
            h.pending = still
            if still:
                if time.monotonic() < h.deadline:
                    return Status.BUSY  # also after a failure: let its siblings land or fail first
                h.error = h.error or f"{len(still)} of {len(h.statuses)} statuses still in flight"
                h.error += f" after transfer_timeout_s={self._timeout:g}"
            if h.error:
                logger.warning("MoRI %s with %s failed: %s", h.op.value, h.peer, h.error)
                h.result = Status.FAILED
                return h.result
            if h.notify is not None:
                self.notify(h.peer, h.notify)
            h.result = Status.DONE
            return h.result
        except Exception as e:
            logger.warning("MoRI %s with %s failed: %s: %s", h.op.value, h.peer, type(e).__name__, e)
            h.result = Status.FAILED
            return h.result

    def release(self, handle: Any) -> None:
        h: _Handle = handle
        if h.pending and h.result is None:
            logger.debug("releasing a MoRI %s with %d statuses still in flight (MoRI cannot cancel)",
                         h.op.value, len(h.pending))
        h.statuses, h.pending = [], []

    # -- notifications ------------------------------------------------------------------------------
    def notify(self, peer: str, message: bytes) -> None:
        p = self._peers.get(peer)
        if p is None:
            raise TransferError(f"MoRI peer {peer!r} is not loaded")
        self._mailbox.send(p.mailbox[0], p.mailbox[1], self._key, message)

    def notifications(self) -> list[tuple[str, bytes]]:
        return self._mailbox.drain()

    def close(self) -> None:
        for peer in list(self._peers):
            self.remove_peer(peer)
        for md in self._local:
            self._deregister(md)
        self._local = []
        self._mailbox.close()

    def _deregister(self, md: Any) -> None:
        try:
            self._engine.deregister_memory(md)
        except Exception:
            logger.debug("MoRI deregister_memory failed", exc_info=True)
