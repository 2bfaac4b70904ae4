"""In-process fake of MoRI-IO's Python API (``mori.io``, ROCm/mori), for CPU-only tests.

The module stands in for ``mori.io``: names, signatures, enums, return types and status semantics
follow ROCm/mori (python/mori/io/engine.py over the pybind module in src/pybind/pybind_io.cpp;
see tests/fakes/MORI_API.md). Engines in one process find each other through a module-level registry
keyed by engine key, and transfers really copy bytes between registered host memory
(``ctypes.memmove``; torch copies when a registered tensor lives on a CUDA device).

Fake-only extras are named ``fake_*`` / ``FakeMori*`` so they can never be mistaken for real API:

- ``knobs`` (a :class:`FakeMoriKnobs`; reset with ``reset()``) and ``IOEngine.fake_knobs`` (per
  engine, overrides the global knobs for transfers that engine initiates): completion after N polls,
  timer completion, injected failures, hangs, the emulated mori version.
- ``kill_engine(key_or_engine)`` / ``IOEngine.fake_kill()``: the peer disappears.
- ``IOEngine.fake_flush(fail_code=None)``: land (or fail) every in-flight transfer now.
- ``installed()``: context manager that puts this module in ``sys.modules`` as ``mori.io`` (and a
  ``mori.cpp`` stand-in), for code that imports ``mori.io`` by name.

What "polling" means (as in real mori, where every accessor runs the status's progress hook):
``Code()``, ``Init()``, ``InProgress()``, ``Succeeded()``, ``Failed()`` and ``WaitFor(0)`` each
count as one poll; ``Message()`` does not. A transfer "lands" (bytes copied, then the target's
inbound notification recorded, then the status set to SUCCESS) on its ``polls_to_complete``-th poll,
or inside the submitting call when that knob is 0, or when anyone blocks on it (``Wait()``,
``WaitFor(t != 0)``, ``wait_all`` with a non-zero timeout) — unless it hangs or is timer-driven.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import itertools
import operator
import os
import socket
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import msgspec

# --------------------------------------------------------------------------------------------- #
# Enums (pybind11 `enum_` of `enum class`: int() works, == against a plain int is False)          #
# --------------------------------------------------------------------------------------------- #


class _PybindEnum(enum.Enum):
    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value


class BackendType(_PybindEnum):
    Unknown = 0
    XGMI = 1
    RDMA = 2
    TCP = 3
    FABRIC = 4


class MemoryLocationType(_PybindEnum):
    Unknown = 0
    CPU = 1
    GPU = 2


class StatusCode(_PybindEnum):
    SUCCESS = 0
    INIT = 1
    IN_PROGRESS = 2
    # ERR_BEGIN = 10 exists in C++ but is not exported to Python.
    ERR_INVALID_ARGS = 11
    ERR_NOT_FOUND = 12
    ERR_RDMA_OP = 13
    ERR_BAD_STATE = 14
    ERR_GPU_OP = 15


_ERR_BEGIN = 10


class PollCqMode(_PybindEnum):
    POLLING = 0
    EVENT = 1


def _check_type(value, cls, what: str):
    if not isinstance(value, cls):
        raise TypeError(
            f"{what}(): incompatible function arguments: expected {cls.__name__}, got {type(value).__name__}"
        )
    return value


def _as_size(value, what: str) -> int:
    """pybind11 size_t / uint64 conversion: int-like (incl. numpy ints), non-negative, not float."""
    if isinstance(value, float):
        raise TypeError(f"{what}: incompatible function arguments: float {value!r} is not an integer")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{what}: incompatible function arguments: {type(value).__name__} is not an integer"
        ) from None
    if v < 0:
        raise TypeError(f"{what}: incompatible function arguments: {v} is negative (size_t)")
    return v


def _as_size_list(value, what: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{what}: incompatible function arguments: expected a sequence of integers")
    return [_as_size(v, what) for v in value]


# --------------------------------------------------------------------------------------------- #
# Configs                                                                                       #
# --------------------------------------------------------------------------------------------- #


class IOEngineConfig:
    def __init__(self, host: str = "", port: int = 0):
        self.host = _check_type(host, str, "IOEngineConfig")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
            raise TypeError("IOEngineConfig(): port must be an int in [0, 65535] (uint16_t)")
        self.port = port

    def __repr__(self) -> str:
        return f"IOEngineConfig(host={self.host!r}, port={self.port})"


class BackendConfig:
    """Base class (no constructor in Python, as in pybind)."""

    _backend_type: BackendType = BackendType.Unknown


class RdmaBackendConfig(BackendConfig):
    _backend_type = BackendType.RDMA

    def __init__(
        self,
        qp_per_transfer: int = 1,
        post_batch_size: int = -1,
        num_worker_threads: int = -1,
        poll_cq_mode: PollCqMode = PollCqMode.POLLING,
        enable_notification: bool = True,
        notif_per_qp: int = 1024,
        enable_transfer_chunking: bool = False,
        chunk_bytes: int = 65536,
        max_chunks_per_transfer: int = 64,
        num_nics_per_transfer: int = 1,
    ):
        _check_type(poll_cq_mode, PollCqMode, "RdmaBackendConfig")
        self.qp_per_transfer = int(qp_per_transfer)
        self.post_batch_size = int(post_batch_size)
        self.num_worker_threads = int(num_worker_threads)
        self.poll_cq_mode = poll_cq_mode
        self.enable_notification = bool(enable_notification)
        self.notif_per_qp = int(notif_per_qp)
        self.enable_transfer_chunking = bool(enable_transfer_chunking)
        self.chunk_bytes = int(chunk_bytes)
        self.max_chunks_per_transfer = int(max_chunks_per_transfer)
        self.num_nics_per_transfer = int(num_nics_per_transfer)
        self.max_send_wr = 0
        self.max_cqe_num = 0
        self.max_msg_sge = 0


class XgmiBackendConfig(BackendConfig):
    _backend_type = BackendType.XGMI

    def __init__(self, num_streams: int = 64, num_events: int = 64):
        self.num_streams = int(num_streams)
        self.num_events = int(num_events)


class FabricBackendConfig(BackendConfig):
    _backend_type = BackendType.FABRIC

    def __init__(self, num_streams: int = 64, num_events: int = 64):
        self.num_streams = int(num_streams)
        self.num_events = int(num_events)


# --------------------------------------------------------------------------------------------- #
# Knobs                                                                                         #
# --------------------------------------------------------------------------------------------- #


class TransferInfo(NamedTuple):
    """What a knob filter sees about one transfer (one TransferStatus)."""

    initiator_key: str
    remote_key: str
    uid: int
    seq: int  # 0-based count of transfers (statuses) the initiating engine submitted past validation
    op: str  # "read" | "write"
    nbytes: int
    session: bool  # submitted through an IOEngineSession


class FakeMoriHangError(RuntimeError):
    """Raised by Wait()/WaitFor(-1)/wait_all(timeout_ms=-1) when a status never completes.

    Real mori blocks forever there; the fake gives up after ``wait_hang_cap_s`` so that a caller
    that waits without a deadline fails its test instead of hanging it.
    """


@dataclass
class FakeMoriKnobs:
    # A transfer lands on its Nth poll (0: inside the submitting call, status already SUCCESS).
    polls_to_complete: int = 1
    # If set, transfers land on a timer after this many seconds; polls do not advance them.
    complete_after_s: Optional[float] = None
    # Transfers that never complete (stay IN_PROGRESS). A callable is a filter over TransferInfo.
    hang: bool | Callable[[TransferInfo], bool] = False
    # Injected failure: transfers selected by fail_filter (None: all) fail with this code/message
    # when they would land (or inside the submitting call when fail_at_submit). No bytes move.
    fail_code: Optional[StatusCode] = None
    fail_message: str = "fake_mori: injected transfer failure"
    fail_filter: Optional[Callable[[TransferInfo], bool]] = None
    fail_at_submit: bool = False
    # How long an unbounded wait on a never-completing status blocks before FakeMoriHangError.
    wait_hang_cap_s: float = 10.0
    # (1, 2, 0) added IOEngine.wait_all and TransferStatus.WaitFor; older versions lack both.
    emulate_version: tuple = (1, 2, 2)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    # Filter helpers -------------------------------------------------------------------------
    @staticmethod
    def uids(*uids: int) -> Callable[[TransferInfo], bool]:
        wanted = set(uids)
        return lambda info: info.uid in wanted

    @staticmethod
    def nth(*seqs: int) -> Callable[[TransferInfo], bool]:
        wanted = set(seqs)
        return lambda info: info.seq in wanted

    @staticmethod
    def to_peer(key: str) -> Callable[[TransferInfo], bool]:
        return lambda info: info.remote_key == key


knobs = FakeMoriKnobs()


def _has_sync_wait_api() -> bool:
    return tuple(knobs.emulate_version) >= (1, 2, 0)


# --------------------------------------------------------------------------------------------- #
# TransferStatus                                                                                #
# --------------------------------------------------------------------------------------------- #


class TransferStatus:
    """mori.cpp.TransferStatus. Every accessor but Message() is a poll (runs the progress hook)."""

    def __init__(self):
        self._code = StatusCode.INIT
        self._msg = ""
        self._cv = threading.Condition()
        self._transfer: Optional[_Transfer] = None  # fake: the transfer driving this status

    def __repr__(self) -> str:
        return f"<TransferStatus {self._code.name} {self._msg!r}>"

    # progress ---------------------------------------------------------------------------
    def _poll_progress(self) -> None:
        if self._code is StatusCode.IN_PROGRESS and self._transfer is not None:
            self._transfer._on_poll()

    # API ----------------------------------------------------------------------------------
    def Code(self) -> StatusCode:
        self._poll_progress()
        return self._code

    def Message(self) -> str:
        with self._cv:
            return self._msg

    def Update(self, val: StatusCode, message: str) -> None:
        _check_type(val, StatusCode, "Update")
        _check_type(message, str, "Update")
        with self._cv:
            if self._code.value > _ERR_BEGIN:  # a failure is final
                return
            self._msg = message
            self._code = val
            self._cv.notify_all()

    def Init(self) -> bool:
        return self.Code() is StatusCode.INIT

    def InProgress(self) -> bool:
        return self.Code() is StatusCode.IN_PROGRESS

    def Succeeded(self) -> bool:
        return self.Code() is StatusCode.SUCCESS

    def Failed(self) -> bool:
        return self.Code().value > _ERR_BEGIN

    def SetCode(self, val: StatusCode) -> None:
        _check_type(val, StatusCode, "SetCode")
        with self._cv:
            self._code = val
            if val not in (StatusCode.INIT, StatusCode.IN_PROGRESS):
                self._cv.notify_all()

    def SetMessage(self, val: str) -> None:
        _check_type(val, str, "SetMessage")
        with self._cv:
            self._msg = val

    def Wait(self) -> None:
        self._wait_for(-1)

    @property
    def WaitFor(self):
        if not _has_sync_wait_api():
            raise AttributeError("'TransferStatus' object has no attribute 'WaitFor'")
        return self._wait_for

    def _wait_for(self, timeout_ms: int = -1) -> StatusCode:
        """timeout_ms < 0: until done; 0: poll once; > 0: up to the deadline (may return IN_PROGRESS)."""
        timeout_ms = int(timeout_ms)
        if self._code is not StatusCode.IN_PROGRESS:
            return self._code
        self._poll_progress()
        if timeout_ms == 0:
            return self._code
        t = self._transfer
        if t is not None:
            t._on_block()
        cap = (t.knobs if t is not None else knobs).wait_hang_cap_s
        now = time.monotonic()
        deadline = now + timeout_ms / 1000.0 if timeout_ms > 0 else now + cap
        with self._cv:
            while self._code is StatusCode.IN_PROGRESS:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if timeout_ms > 0:
                        break
                    raise FakeMoriHangError(
                        f"fake_mori: unbounded wait on a status still IN_PROGRESS after {cap:.3g}s "
                        "(real mori would block forever; wait with a deadline)"
                    )
                self._cv.wait(remaining)
            return self._code


# --------------------------------------------------------------------------------------------- #
# Descriptors (msgpack arrays laid out like MSGPACK_DEFINE in include/mori/io/common.hpp)        #
# --------------------------------------------------------------------------------------------- #

_IPC_HANDLE_SIZE = 64
_NOT_CONSTRUCTIBLE = object()


def _unpack_array(b, cls_name: str) -> list:
    if not isinstance(b, bytes):
        raise TypeError(
            f"unpack(): incompatible function arguments: expected bytes, got {type(b).__name__}"
        )
    try:
        obj = msgspec.msgpack.decode(b)
    except msgspec.DecodeError as e:
        raise RuntimeError(f"{cls_name}.unpack: msgpack parse error: {e}") from None
    if not isinstance(obj, list):
        raise RuntimeError(
            f"std::bad_cast ({cls_name}.unpack: expected a msgpack array, got {type(obj).__name__})"
        )
    return obj


def _field_str(arr: list, i: int, name: str, default: str = "") -> str:
    if i >= len(arr):  # msgpack-c define_array leaves missing trailing fields at their defaults
        return default
    v = arr[i]
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="surrogateescape")
    raise RuntimeError(f"std::bad_cast (field {name}: expected string, got {type(v).__name__})")


def _field_int(arr: list, i: int, name: str, lo: int, hi: int, default: int = 0) -> int:
    if i >= len(arr):
        return default
    v = arr[i]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RuntimeError(f"std::bad_cast (field {name}: expected integer in [{lo}, {hi}], got {v!r})")
    return v


def _field_bin(arr: list, i: int, name: str, size: int) -> bytes:
    if i >= len(arr):
        return bytes(size)
    v = arr[i]
    if isinstance(v, str):
        v = v.encode()
    if not isinstance(v, bytes) or len(v) > size:
        raise RuntimeError(f"std::bad_cast (field {name}: expected <= {size} bytes)")
    return v.ljust(size, b"\0")


_I32 = (-(2**31), 2**31 - 1)
_U32 = (0, 2**32 - 1)
_U64 = (0, 2**64 - 1)


class EngineDesc:
    """mori.cpp.EngineDesc: read-only fields, ==, unhashable; no Python constructor."""

    __hash__ = None  # pybind11 sets __hash__ = None when only __eq__ is bound

    def __init__(self, *args, **kwargs):
        if not args or args[0] is not _NOT_CONSTRUCTIBLE:
            raise TypeError("mori.cpp.EngineDesc: No constructor defined!")
        _, self._key, self._node_id, self._hostname, self._host, self._port, self._pid = args

    key = property(lambda self: self._key)
    node_id = property(lambda self: self._node_id)
    hostname = property(lambda self: self._hostname)
    host = property(lambda self: self._host)
    port = property(lambda self: self._port)
    pid = property(lambda self: self._pid)

    def _fields(self) -> tuple:
        return (self._key, self._node_id, self._hostname, self._host, self._port, self._pid)

    def __eq__(self, other):
        if not isinstance(other, EngineDesc):
            return NotImplemented
        return self._fields() == other._fields()

    def __repr__(self) -> str:
        return f"<EngineDesc key={self._key!r} host={self._host!r} port={self._port} pid={self._pid}>"

    def pack(self) -> bytes:
        return msgspec.msgpack.encode(list(self._fields()))

    @staticmethod
    def unpack(b: bytes) -> EngineDesc:
        a = _unpack_array(b, "EngineDesc")
        return EngineDesc(
            _NOT_CONSTRUCTIBLE,
            _field_str(a, 0, "key"),
            _field_str(a, 1, "node_id"),
            _field_str(a, 2, "hostname"),
            _field_str(a, 3, "host"),
            _field_int(a, 4, "port", *_I32),
            _field_int(a, 5, "pid", *_I32),
        )


class MemoryDesc:
    """mori.cpp.MemoryDesc: default-constructible, read-only fields, == (no ipc/fabric fields), unhashable."""

    __hash__ = None

    def __init__(self):
        self._engine_key = ""
        self._id = 0
        self._device_id = -1
        self._device_bus_id = ""
        self._data = 0
        self._size = 0
        self._loc = MemoryLocationType.Unknown
        self._ipc_handle = bytes(_IPC_HANDLE_SIZE)
        self._numa_node = -1
        self._ipc_offset = 0
        self._fabric_handle = bytes(_IPC_HANDLE_SIZE)
        self._vpod_id = -1
        self._vpod_ppod_id = ""
        self._fabric_offset = 0
        self._fabric_alloc_size = 0

    engine_key = property(lambda self: self._engine_key)
    id = property(lambda self: self._id)
    device_id = property(lambda self: self._device_id)
    device_bus_id = property(lambda self: self._device_bus_id)
    numa_node = property(lambda self: self._numa_node)
    data = property(lambda self: self._data)
    size = property(lambda self: self._size)
    loc = property(lambda self: self._loc)
    ipc_handle = property(lambda self: self._ipc_handle)

    def _eq_fields(self) -> tuple:
        return (
            self._engine_key, self._id, self._device_id, self._device_bus_id, self._data,
            self._size, self._loc, self._numa_node, self._ipc_offset,
        )

    def __eq__(self, other):
        if not isinstance(other, MemoryDesc):
            return NotImplemented
        return self._eq_fields() == other._eq_fields()

    def __repr__(self) -> str:
        return (
            f"<MemoryDesc engine_key={self._engine_key!r} id={self._id} data={self._data:#x} "
            f"size={self._size} loc={self._loc.name} device_id={self._device_id}>"
        )

    def pack(self) -> bytes:
        return msgspec.msgpack.encode(
            [
                self._engine_key, self._id, self._device_id, self._device_bus_id, self._data,
                self._size, self._loc.value, self._ipc_handle, self._numa_node, self._ipc_offset,
                self._fabric_handle, self._vpod_id, self._vpod_ppod_id, self._fabric_offset,
                self._fabric_alloc_size,
            ]
        )

    @staticmethod
    def unpack(b: bytes) -> MemoryDesc:
        a = _unpack_array(b, "MemoryDesc")
        d = MemoryDesc()
        d._engine_key = _field_str(a, 0, "engine_key")
        d._id = _field_int(a, 1, "id", *_U32)
        d._device_id = _field_int(a, 2, "device_id", *_I32, default=-1)
        d._device_bus_id = _field_str(a, 3, "device_bus_id")
        d._data = _field_int(a, 4, "data", *_U64)
        d._size = _field_int(a, 5, "size", *_U64)
        loc = _field_int(a, 6, "loc", *_U32)
        try:
            d._loc = MemoryLocationType(loc)
        except ValueError:
            raise RuntimeError(f"std::bad_cast (field loc: unknown MemoryLocationType {loc})") from None
        d._ipc_handle = _field_bin(a, 7, "ipc_handle", _IPC_HANDLE_SIZE)
        d._numa_node = _field_int(a, 8, "numa_node", *_I32, default=-1)
        d._ipc_offset = _field_int(a, 9, "ipc_offset", *_U64)
        d._fabric_handle = _field_bin(a, 10, "fabric_handle", _IPC_HANDLE_SIZE)
        d._vpod_id = _field_int(a, 11, "vpod_id", *_I32, default=-1)
        d._vpod_ppod_id = _field_str(a, 12, "vpod_ppod_id")
        d._fabric_offset = _field_int(a, 13, "fabric_offset", *_U64)
        d._fabric_alloc_size = _field_int(a, 14, "fabric_alloc_size", *_U64)
        return d


# --------------------------------------------------------------------------------------------- #
# Engine internals                                                                              #
# --------------------------------------------------------------------------------------------- #

_registry_lock = threading.RLock()
_ENGINES: dict[str, IOEngine] = {}
_PORTS = itertools.count(47000)


def _node_id() -> str:
    env = os.environ.get("MORI_NODE_ID")
    if env:
        return env
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


class _Region:
    """A registered memory region (fake-internal)."""

    __slots__ = ("desc", "tensor", "valid")

    def __init__(self, desc: MemoryDesc, tensor=None):
        self.desc = desc
        self.tensor = tensor  # kept alive while registered (real mori keeps only the pointer)
        self.valid = True

    def is_cuda(self) -> bool:
        return self.tensor is not None and self.tensor.device.type != "cpu"

    def byte_view(self):
        import torch

        if self.tensor is not None:
            return self.tensor.reshape(-1).view(torch.uint8)
        buf = (ctypes.c_char * self.desc.size).from_address(self.desc.data)
        return torch.frombuffer(buf, dtype=torch.uint8)


def _copy(dst: _Region, dst_off: int, src: _Region, src_off: int, n: int) -> None:
    if n == 0:
        return
    if not dst.is_cuda() and not src.is_cuda():
        ctypes.memmove(dst.desc.data + dst_off, src.desc.data + src_off, n)
        return
    dst.byte_view()[dst_off : dst_off + n].copy_(src.byte_view()[src_off : src_off + n])


class _Backend:
    """One created backend of an engine: its view of remote engines, memories and inbound notifs."""

    def __init__(self, engine: IOEngine, btype: BackendType, config: BackendConfig):
        self.engine = engine
        self.type = btype
        self.config = config
        self.remotes: dict[str, EngineDesc] = {}
        self.mem_ids: set[int] = set()  # memories registered while this backend existed
        self.inbound: dict[str, dict[int, int]] = {}
        self.sessions: dict[tuple[str, int, int], _BackendSession] = {}
        # The peer incarnation whose "QPs" this backend holds, per remote key. Like real mori, it is
        # never replaced: re-registering a restarted peer under the same key does not heal it.
        self.peers: dict[str, IOEngine] = {}
        self.lock = threading.Lock()

    @property
    def notifications(self) -> bool:
        # Only the RDMA backend has inbound notifications (RdmaBackendConfig.enable_notification).
        return bool(getattr(self.config, "enable_notification", False))

    def can_handle(self, local: MemoryDesc, remote: MemoryDesc) -> bool:
        if self.type is BackendType.FABRIC:
            return False  # needs a UALink vPOD; never chosen by the fake
        if self.type is BackendType.XGMI:
            # Intra-node GPU<->GPU only; the own engine needs no registration.
            if local.loc is not MemoryLocationType.GPU or remote.loc is not MemoryLocationType.GPU:
                return False
            if remote.engine_key == self.engine._key:
                return True
            rdesc = self.remotes.get(remote.engine_key)
            return rdesc is not None and rdesc.node_id == self.engine._desc.node_id
        return remote.engine_key in self.remotes

    def connect(self, local: MemoryDesc, remote: MemoryDesc) -> _BackendSession:
        """Build a session; raises RuntimeError like the real first-contact failures do."""
        eng = self.engine
        lregion = eng._mem.get(local.id)
        if lregion is None or local.engine_key != eng._key:
            raise RuntimeError(
                f"fake_mori: local memory id {local.id} (engine {local.engine_key!r}) is not registered "
                f"with engine {eng._key!r}"
            )
        rkey = remote.engine_key
        if rkey == eng._key:
            live = eng
        else:
            rdesc = self.remotes.get(rkey)
            with _registry_lock:
                live = _ENGINES.get(rkey)
            # The control plane dials rdesc.host:port; only the engine that owns that desc answers.
            if rdesc is None or live is None or live._killed or live._desc != rdesc:
                raise RuntimeError(
                    f"fake_mori: cannot connect to remote engine {rkey!r} "
                    f"({'not registered' if rdesc is None else 'connection refused: peer is gone'})"
                )
        pbackend = live._backends.get(self.type)
        if pbackend is None:
            raise RuntimeError(f"fake_mori: remote engine {rkey!r} has no {self.type.name} backend")
        rregion = live._mem.get(remote.id)
        got = rregion.desc.size if (rregion is not None and remote.id in pbackend.mem_ids) else 0
        if got != remote.size:
            raise RuntimeError(
                f"RdmaBackend::CreateSession: remote MR size mismatch for engine {rkey} memId={remote.id} "
                f"expected={remote.size} got={got}"
            )
        with self.lock:
            qp_peer = self.peers.setdefault(rkey, live)
        return _BackendSession(self, lregion, qp_peer, rregion)

    def cached_session(self, local: MemoryDesc, remote: MemoryDesc) -> _BackendSession:
        key = (remote.engine_key, local.id, remote.id)
        with self.lock:
            sess = self.sessions.get(key)
        if sess is None:
            sess = self.connect(local, remote)
            with self.lock:
                sess = self.sessions.setdefault(key, sess)
        return sess

    def record_inbound(self, initiator_key: str, uid: int) -> None:
        with self.lock:
            pool = self.inbound.setdefault(initiator_key, {})
            if uid not in pool:
                pool[uid] = 1  # totalNum (the fake sends one notification per transfer)
            pool[uid] -= 1  # a reused uid drives the count below 0: it never pops again

    def pop_inbound(self, remote_key: str, uid: int) -> bool:
        with self.lock:
            return self.inbound.get(remote_key, {}).get(uid) == 0  # not erased, as in real mori


class _BackendSession:
    def __init__(self, backend: _Backend, local: _Region, peer: IOEngine, remote: _Region):
        self.backend = backend
        self.local = local
        self.peer = peer
        self.remote = remote

    def submit(self, is_read: bool, loffs, roffs, sizes, uid: int, status: TransferStatus, *,
               session_api: bool) -> None:
        status.SetCode(StatusCode.IN_PROGRESS)
        if not (len(loffs) == len(roffs) == len(sizes)):
            status.Update(
                StatusCode.ERR_INVALID_ARGS, "lengths of local offsets, remote offsets or sizes mismatch"
            )
            return
        for lo, ro, n in zip(loffs, roffs, sizes):
            if n > 0xFFFFFFFF:
                status.Update(StatusCode.ERR_INVALID_ARGS,
                              f"single request size {n} exceeds UINT32_MAX; split it before submitting")
                return
            if lo + n > self.local.desc.size or ro + n > self.remote.desc.size:
                status.Update(StatusCode.ERR_INVALID_ARGS, "length out of range")
                return
        eng = self.backend.engine
        kn = eng.fake_knobs or knobs
        info = TransferInfo(eng._key, self.peer._key, uid, next(eng._seq), "read" if is_read else "write",
                            sum(sizes), session_api)
        t = _Transfer(self, is_read, list(zip(loffs, roffs, sizes)), uid, status, kn, info)
        t.start()


class _Transfer:
    """One in-flight transfer driving one TransferStatus (fake-internal)."""

    def __init__(self, sess: _BackendSession, is_read: bool, copies, uid: int, status: TransferStatus,
                 kn: FakeMoriKnobs, info: TransferInfo):
        self.sess = sess
        self.is_read = is_read
        self.copies = copies
        self.uid = uid
        self.status = status
        self.knobs = kn
        self.info = info
        self.lock = threading.Lock()
        self.done = False
        hang = kn.hang(info) if callable(kn.hang) else bool(kn.hang)
        self.fail = None
        if kn.fail_code is not None and (kn.fail_filter is None or kn.fail_filter(info)):
            self.fail = (_check_type(kn.fail_code, StatusCode, "fake knobs"), kn.fail_message)
        if hang:
            self.mode = "hang"
        elif kn.complete_after_s is not None:
            self.mode = "timer"
        else:
            self.mode = "polls"
        self.polls_left = max(0, int(kn.polls_to_complete))

    def start(self) -> None:
        eng = self.sess.backend.engine
        if self.fail is not None and self.knobs.fail_at_submit:
            self.done = True
            self.status.Update(*self.fail)
            return
        self.status._transfer = self
        with eng._lock:
            eng._inflight.add(self)
        if self.mode == "polls" and self.polls_left == 0:
            self.land()
        elif self.mode == "timer":
            timer = threading.Timer(float(self.knobs.complete_after_s), self.land)
            timer.daemon = True
            timer.start()

    def _on_poll(self) -> None:
        with self.lock:
            if self.done or self.mode != "polls":
                return
            self.polls_left -= 1
            if self.polls_left > 0:
                return
        self.land()

    def _on_block(self) -> None:
        if self.mode == "polls":
            self.land()

    def land(self, forced: Optional[tuple] = None) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
        sess = self.sess
        eng = sess.backend.engine
        with eng._lock:
            eng._inflight.discard(self)
        result = forced or self.fail or self._check_live()
        if result is None:
            for lo, ro, n in self.copies:
                if self.is_read:
                    _copy(sess.local, lo, sess.remote, ro, n)
                else:
                    _copy(sess.remote, ro, sess.local, lo, n)
            pb = sess.peer._backends.get(sess.backend.type)
            if sess.backend.notifications and pb is not None and pb.notifications:
                pb.record_inbound(eng._key, self.uid)
            result = (StatusCode.SUCCESS, "")
        self.status.Update(*result)

    def _check_live(self) -> Optional[tuple]:
        sess = self.sess
        eng = sess.backend.engine
        with _registry_lock:
            peer_now = _ENGINES.get(sess.peer._key)
        if eng._killed:
            return (StatusCode.ERR_RDMA_OP, "fake_mori: local engine was killed")
        if sess.peer is not eng and (peer_now is not sess.peer or sess.peer._killed):
            return (StatusCode.ERR_RDMA_OP,
                    f"fake_mori: transport retry counter exceeded (peer {sess.peer._key!r} is gone)")
        if not sess.remote.valid:
            return (StatusCode.ERR_RDMA_OP, "fake_mori: remote access error (remote memory deregistered)")
        if not sess.local.valid:
            return (StatusCode.ERR_RDMA_OP, "fake_mori: local protection error (local memory deregistered)")
        return None


# --------------------------------------------------------------------------------------------- #
# Public engine API (python/mori/io/engine.py)                                                   #
# --------------------------------------------------------------------------------------------- #

TORCH_DEVICE_TYPE_MAP = {
    "cpu": MemoryLocationType.CPU,
    "cuda": MemoryLocationType.GPU,
}


class IOEngineSession:
    """Low-latency session between one local and one remote MemoryDesc (one status per call)."""

    def __init__(self, mori_sess: _BackendSession):
        self._sess = mori_sess

    def allocate_transfer_uid(self) -> int:
        return self._sess.backend.engine.allocate_transfer_uid()

    def _single(self, is_read, local_offset, remote_offset, size, transfer_uid) -> TransferStatus:
        what = "read" if is_read else "write"
        lo = _as_size(local_offset, what)
        ro = _as_size(remote_offset, what)
        n = _as_size(size, what)
        uid = _as_size(transfer_uid, what)
        st = TransferStatus()
        self._sess.submit(is_read, [lo], [ro], [n], uid, st, session_api=True)
        return st

    def _batch(self, is_read, local_offsets, remote_offsets, sizes, transfer_uid) -> TransferStatus:
        what = "batch_read" if is_read else "batch_write"
        lo = _as_size_list(local_offsets, what)
        ro = _as_size_list(remote_offsets, what)
        ns = _as_size_list(sizes, what)
        uid = _as_size(transfer_uid, what)
        st = TransferStatus()
        if len(lo) == len(ro) == len(ns) == 0:
            # RdmaBatchReadWrite returns SUCCESS for an empty batch; the notification still goes out.
            st.SetCode(StatusCode.IN_PROGRESS)
            st.Update(StatusCode.SUCCESS, "")
            sess = self._sess
            pb = sess.peer._backends.get(sess.backend.type)
            if sess.backend.notifications and pb is not None and pb.notifications:
                pb.record_inbound(sess.backend.engine._key, uid)
            return st
        self._sess.submit(is_read, lo, ro, ns, uid, st, session_api=True)
        return st

    def read(self, *args) -> TransferStatus:
        return self._single(True, *args)

    def write(self, *args) -> TransferStatus:
        return self._single(False, *args)

    def batch_read(self, *args) -> TransferStatus:
        return self._batch(True, *args)

    def batch_write(self, *args) -> TransferStatus:
        return self._batch(False, *args)

    def alive(self) -> bool:
        return True  # RdmaBackendSession::Alive() is constant true in real mori


class IOEngine:
    def __init__(self, key, config: IOEngineConfig):
        _check_type(key, str, "IOEngine")
        _check_type(config, IOEngineConfig, "IOEngine")
        self._key = key
        self._config = IOEngineConfig(config.host, config.port)
        self._desc = EngineDesc(
            _NOT_CONSTRUCTIBLE, key, _node_id(), socket.gethostname(), config.host, config.port, os.getpid()
        )
        self._backends: dict[BackendType, _Backend] = {}
        self._mem: dict[int, _Region] = {}
        self._mem_ids = itertools.count(0)
        self._uids = itertools.count(0)
        self._seq = itertools.count(0)
        self._lock = threading.RLock()
        self._inflight: set[_Transfer] = set()
        self._killed = False
        self.fake_knobs: Optional[FakeMoriKnobs] = None  # fake-only: overrides the global knobs
        with _registry_lock:
            _ENGINES[key] = self  # a new engine with the same key replaces ("restarts") the old one

    def __repr__(self) -> str:
        return f"<fake_mori.IOEngine {self._key!r}{' killed' if self._killed else ''}>"

    def get_engine_desc(self) -> EngineDesc:
        return EngineDesc(_NOT_CONSTRUCTIBLE, *self._desc._fields())

    def create_backend(self, type: BackendType, config=None):
        _check_type(type, BackendType, "create_backend")
        defaults = {
            BackendType.RDMA: RdmaBackendConfig,
            BackendType.XGMI: XgmiBackendConfig,
            BackendType.FABRIC: FabricBackendConfig,
        }
        if type not in defaults:
            raise NotImplementedError("backend not implemented yet")
        if config is None:
            config = defaults[type]()
        if not isinstance(config, defaults[type]):
            raise TypeError(f"create_backend(): {type.name} needs a {defaults[type].__name__}")
        with self._lock:
            if type in self._backends:
                return None  # real: warns "already exists, skip duplicate creation"
            if type is BackendType.RDMA:
                if self._config.port == 0:
                    port = next(_PORTS)
                else:
                    port = self._config.port
                    with _registry_lock:
                        clash = [
                            e for e in _ENGINES.values()
                            if e is not self and not e._killed and BackendType.RDMA in e._backends
                            and e._desc.host == self._config.host and e._desc.port == port
                        ]
                    if clash:
                        raise RuntimeError(f"fake_mori: {self._config.host}:{port} is already bound")
                self._config.port = port
                d = self._desc
                self._desc = EngineDesc(_NOT_CONSTRUCTIBLE, d.key, d.node_id, d.hostname, d.host, port, d.pid)
            self._backends[type] = _Backend(self, type, config)
        return None

    def remove_backend(self, type: BackendType):
        _check_type(type, BackendType, "remove_backend")
        with self._lock:
            self._backends.pop(type, None)

    def register_remote_engine(self, engine_desc: EngineDesc):
        _check_type(engine_desc, EngineDesc, "register_remote_engine")
        with self._lock:
            # No backend yet: nothing remembers it (as in real mori). Cached sessions/QPs are kept.
            for be in self._backends.values():
                with be.lock:
                    be.remotes[engine_desc.key] = engine_desc

    def deregister_remote_engine(self, engine_desc: EngineDesc):
        _check_type(engine_desc, EngineDesc, "deregister_remote_engine")
        with self._lock:
            for be in self._backends.values():  # sessions already built keep working
                with be.lock:
                    be.remotes.pop(engine_desc.key, None)

    def _register(self, ptr: int, size: int, device_id: int, mem_loc: MemoryLocationType, tensor=None):
        d = MemoryDesc()
        d._engine_key = self._key
        d._id = next(self._mem_ids)
        d._device_id = int(device_id)
        d._data = int(ptr)
        d._size = int(size)
        d._loc = mem_loc
        if mem_loc is MemoryLocationType.GPU and tensor is not None:
            d._device_bus_id = f"0000:{int(device_id) & 0xff:02x}:00.0"
        region = _Region(d, tensor)
        with self._lock:
            self._mem[d._id] = region
            for be in self._backends.values():
                be.mem_ids.add(d._id)
        return MemoryDesc.unpack(d.pack())  # hand out a copy, as pybind returns by value

    def register_memory(self, ptr: int, size: int, device_id: int, mem_loc: MemoryLocationType):
        _as_size(ptr, "register_memory")
        _as_size(size, "register_memory")
        _check_type(mem_loc, MemoryLocationType, "register_memory")
        return self._register(ptr, size, device_id, mem_loc)

    def register_torch_tensor(self, tensor):
        if not tensor.is_contiguous():
            raise RuntimeError("input tensor must be contiguous")
        total_bytes = tensor.nelement() * tensor.element_size()
        device_id = tensor.device.index
        if device_id is None:
            device_id = -1
        mem_loc = TORCH_DEVICE_TYPE_MAP[tensor.device.type]
        return self._register(tensor.data_ptr(), total_bytes, device_id, mem_loc, tensor=tensor)

    def deregister_memory(self, mem_desc: MemoryDesc):
        _check_type(mem_desc, MemoryDesc, "deregister_memory")
        with self._lock:
            region = self._mem.pop(mem_desc.id, None)
            if region is None:
                return
            region.valid = False
            region.tensor = None
            for be in self._backends.values():
                be.mem_ids.discard(mem_desc.id)
                with be.lock:
                    for k in [k for k in be.sessions if k[1] == mem_desc.id]:
                        del be.sessions[k]

    def allocate_transfer_uid(self) -> int:
        return next(self._uids)

    def _select_backend(self, local: MemoryDesc, remote: MemoryDesc) -> Optional[_Backend]:
        with self._lock:
            for btype in (BackendType.XGMI, BackendType.FABRIC, BackendType.RDMA):
                be = self._backends.get(btype)
                if be is not None and be.can_handle(local, remote):
                    return be
        return None

    def _submit_one(self, is_read, local, loffs, remote, roffs, sizes, uid, status, *, batch: bool):
        be = self._select_backend(local, remote)
        if be is None:
            status.Update(StatusCode.ERR_BAD_STATE, "No available backend found, create backend first")
            return False
        if batch and len(sizes) == 0:
            status.SetCode(StatusCode.SUCCESS)  # RdmaBackend: empty batch succeeds, no notification
            return True
        if local.engine_key != self._key or local.id not in self._mem:
            # Real mori would silently (re)register an MR from the desc; the fake refuses.
            status.Update(StatusCode.ERR_NOT_FOUND,
                          f"fake_mori: local memory id {local.id} is not registered with {self._key!r}")
            return True
        sess = be.cached_session(local, remote)  # may raise RuntimeError (first contact)
        sess.submit(is_read, loffs, roffs, sizes, uid, status, session_api=False)
        return True

    def _single(self, is_read, local_mem_desc, local_offset, remote_mem_desc, remote_offset, size,
                transfer_uid) -> TransferStatus:
        what = "read" if is_read else "write"
        _check_type(local_mem_desc, MemoryDesc, what)
        _check_type(remote_mem_desc, MemoryDesc, what)
        lo, ro, n = _as_size(local_offset, what), _as_size(remote_offset, what), _as_size(size, what)
        uid = _as_size(transfer_uid, what)
        st = TransferStatus()
        self._submit_one(is_read, local_mem_desc, [lo], remote_mem_desc, [ro], [n], uid, st, batch=False)
        return st

    def read(self, *args) -> TransferStatus:
        return self._single(True, *args)

    def write(self, *args) -> TransferStatus:
        return self._single(False, *args)

    def _batch(self, is_read, local_mem_descs, local_offsets, remote_mem_descs, remote_offsets, sizes,
               transfer_uids) -> list:
        what = "batch_read" if is_read else "batch_write"
        for name, seq in (("local descs", local_mem_descs), ("remote descs", remote_mem_descs)):
            if not isinstance(seq, (list, tuple)):
                raise TypeError(f"{what}: {name} must be a list of MemoryDesc (one per desc pair)")
            for d in seq:
                _check_type(d, MemoryDesc, what)
        los = [_as_size_list(x, what + " local_offsets[i]") for x in _seq_of_seq(local_offsets, what)]
        ros = [_as_size_list(x, what + " remote_offsets[i]") for x in _seq_of_seq(remote_offsets, what)]
        nss = [_as_size_list(x, what + " sizes[i]") for x in _seq_of_seq(sizes, what)]
        uids = _as_size_list(transfer_uids, what + " transfer_uids")
        statuses = [TransferStatus() for _ in range(len(nss))]
        n = len(local_mem_descs)
        if not (n == len(remote_mem_descs) == len(los) == len(ros) == len(nss) == len(uids)):
            # Real mori only assert()s this (undefined behaviour in release builds).
            raise ValueError(
                f"{what}: outer lists must all have one entry per desc pair: "
                f"descs={n}/{len(remote_mem_descs)} local_offsets={len(los)} remote_offsets={len(ros)} "
                f"sizes={len(nss)} uids={len(uids)}"
            )
        for i in range(n):
            if not self._submit_one(is_read, local_mem_descs[i], los[i], remote_mem_descs[i], ros[i], nss[i],
                                    uids[i], statuses[i], batch=True):
                break  # real mori returns here: the remaining statuses stay INIT
        return statuses

    def batch_read(self, *args) -> list:
        return self._batch(True, *args)

    def batch_write(self, *args) -> list:
        return self._batch(False, *args)

    def create_session(self, local_mem, remote_mem) -> Optional[IOEngineSession]:
        _check_type(local_mem, MemoryDesc, "create_session")
        _check_type(remote_mem, MemoryDesc, "create_session")
        be = self._select_backend(local_mem, remote_mem)
        if be is None:
            return None
        return IOEngineSession(be.connect(local_mem, remote_mem))  # may raise RuntimeError

    def pop_inbound_transfer_status(self, remote_key, transfer_uid) -> Optional[TransferStatus]:
        _check_type(remote_key, str, "pop_inbound_transfer_status")
        uid = _as_size(transfer_uid, "pop_inbound_transfer_status")
        with self._lock:
            backends = list(self._backends.values())
        for be in backends:
            if be.pop_inbound(remote_key, uid):
                st = TransferStatus()
                st.SetCode(StatusCode.SUCCESS)
                return st
        return None

    @property
    def wait_all(self):
        if not _has_sync_wait_api():
            raise AttributeError("'IOEngine' object has no attribute 'wait_all'")
        return self._wait_all

    def _wait_all(self, statuses, timeout_ms: int = -1) -> StatusCode:
        """Failure-wins wait over many statuses (IOEngine::WaitAll). Empty input succeeds."""
        statuses = list(statuses)
        for s in statuses:
            if s is not None:
                _check_type(s, TransferStatus, "wait_all")
        timeout_ms = int(timeout_ms)
        if not statuses:
            return StatusCode.SUCCESS
        if timeout_ms == 0:
            any_in_progress = False
            for s in statuses:
                if s is None:
                    continue
                rc = s._wait_for(0)
                if rc is StatusCode.IN_PROGRESS:
                    any_in_progress = True
                    continue
                if rc is not StatusCode.SUCCESS:
                    return rc
            return StatusCode.IN_PROGRESS if any_in_progress else StatusCode.SUCCESS
        first_error = StatusCode.SUCCESS
        if timeout_ms < 0:
            for s in statuses:
                if s is None:
                    continue
                rc = s._wait_for(-1)
                if rc is not StatusCode.SUCCESS and first_error is StatusCode.SUCCESS:
                    first_error = rc
            return first_error
        deadline = time.monotonic() + timeout_ms / 1000.0
        for s in statuses:
            if s is None:
                continue
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return first_error if first_error is not StatusCode.SUCCESS else StatusCode.IN_PROGRESS
            rc = s._wait_for(remaining_ms)
            if rc is StatusCode.IN_PROGRESS:
                return first_error if first_error is not StatusCode.SUCCESS else StatusCode.IN_PROGRESS
            if rc is not StatusCode.SUCCESS and first_error is StatusCode.SUCCESS:
                first_error = rc
        return first_error

    # fake-only ---------------------------------------------------------------------------------
    def fake_kill(self) -> None:
        kill_engine(self)

    def fake_flush(self, fail_code: Optional[StatusCode] = None, message: str = "fake_mori: flushed") -> int:
        """Land every in-flight transfer this engine initiated (or fail them with fail_code)."""
        with self._lock:
            pending = list(self._inflight)
        for t in pending:
            t.land(forced=(fail_code, message) if fail_code is not None else None)
        return len(pending)

    def fake_inflight(self) -> int:
        with self._lock:
            return len(self._inflight)


def _seq_of_seq(value, what: str) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{what}: expected a list with one list of integers per desc pair")
    out = list(value)
    for x in out:
        if isinstance(x, (str, bytes)) or not hasattr(x, "__len__"):
            raise TypeError(
                f"{what}: incompatible function arguments: engine-level batch offsets/sizes are lists of "
                "lists (one inner list per desc pair), got an element of type " + type(x).__name__
            )
    return out


# --------------------------------------------------------------------------------------------- #
# Module-level fake controls and the rest of the mori.io namespace                               #
# --------------------------------------------------------------------------------------------- #


def kill_engine(key_or_engine) -> None:
    """The peer disappears: peers can no longer connect, and its transfers (either way) fail on landing."""
    eng = key_or_engine if isinstance(key_or_engine, IOEngine) else _ENGINES.get(key_or_engine)
    if eng is None:
        return
    eng._killed = True
    with _registry_lock:
        if _ENGINES.get(eng._key) is eng:
            del _ENGINES[eng._key]
    with eng._lock:
        pending = list(eng._inflight)
    for t in pending:
        if t.mode != "hang":
            t.land()


FakeMoriIOEngine = IOEngine  # the name DESIGN.md uses for this fake


def get_engine(key: str) -> Optional[IOEngine]:
    with _registry_lock:
        return _ENGINES.get(key)


def reset() -> None:
    """Forget every engine and put the global knobs back to their defaults.

    The registry holds engines strongly (dropping the last Python reference does not make a peer
    disappear, unlike real mori): use kill_engine() for that, and reset() between tests.
    """
    with _registry_lock:
        _ENGINES.clear()
    knobs.reset()


def set_log_level(level: str) -> None:
    return None


def fabric_alloc(size: int, device: int) -> int:
    raise NotImplementedError("fake_mori: FABRIC allocation needs real ROCm hardware")


def fabric_free(ptr: int) -> None:
    raise NotImplementedError("fake_mori: FABRIC allocation needs real ROCm hardware")


# mori.io does `from .engine import *`, which re-exports engine.py's `mori_cpp` module alias.
mori_cpp = types.SimpleNamespace(
    TransferStatus=TransferStatus,
    IOEngineConfig=IOEngineConfig,
    StatusCode=StatusCode,
    BackendType=BackendType,
    EngineDesc=EngineDesc,
    MemoryDesc=MemoryDesc,
    MemoryLocationType=MemoryLocationType,
    PollCqMode=PollCqMode,
    BackendConfig=BackendConfig,
    RdmaBackendConfig=RdmaBackendConfig,
    XgmiBackendConfig=XgmiBackendConfig,
    FabricBackendConfig=FabricBackendConfig,
    fabric_alloc=fabric_alloc,
    fabric_free=fabric_free,
    set_log_level=set_log_level,
)


@contextlib.contextmanager
def installed():
    """Make `import mori.io` / `import mori.cpp` resolve to this fake inside the block."""
    names = ("mori", "mori.io", "mori.cpp")
    saved = {n: sys.modules.get(n) for n in names}
    cpp = types.ModuleType("mori.cpp")
    cpp.__dict__.update(vars(mori_cpp))
    pkg = types.ModuleType("mori")
    pkg.__path__ = []
    pkg.io = sys.modules[__name__]
    pkg.cpp = cpp
    sys.modules.update({"mori": pkg, "mori.io": sys.modules[__name__], "mori.cpp": cpp})
    try:
        yield sys.modules[__name__]
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
