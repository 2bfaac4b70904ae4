"""An in-process stand-in for NIXL's Python agent (``nixl._api.nixl_agent``).

``FakeNixlAgent`` has the real agent's constructor, method names, parameter names, defaults and
return shapes for the calls kvconnect uses, and really copies bytes between registered host
memory (``ctypes.memmove``).  Several fake agents in one process find each other through the
module-level ``registry`` by name, so a prefill side and a decode side can talk in one test.

The module also exports the names the real modules do (``nixl_agent``, ``nixl_agent_config``,
``nixl_xfer_handle``, ``nixl_prepped_dlist_handle``, ``nixlRegDList``, ``nixlXferDList``, the
``nixl*Error`` classes, ``NIXL_INIT_AGENT``, ``DEFAULT_COMM_PORT``), so a test may put it in
``sys.modules`` as ``nixl._api`` and/or ``nixl._bindings``.

Behaviour copied from measurements of nixl-cu12 1.5.1 (see tests/integration/test_nixl_contract.py,
which runs the same cases against both):

- ``add_remote_agent`` returns the remote name as *bytes*; ``get_new_notifs`` keys are *str*.
- descriptors outside registered memory (or spanning two registrations, or with another device
  id) raise ``nixlNotFoundError`` at ``prep_xfer_dlist`` / ``initialize_xfer``; bad indices,
  index-count or length mismatches and wrong handle sides raise ``nixlInvalidParamError`` at
  ``make_prepped_xfer``; garbage metadata raises ``nixlMismatchError``.
- memory registered after ``get_agent_metadata`` is unknown to a peer until it loads fresh
  metadata; reloading metadata of the same agent keeps prepared lists valid; after
  ``remove_remote_agent`` they are stale (``nixlNotFoundError`` at make/transfer). Metadata of
  another agent under a name already loaded (a restarted peer) raises ``nixlNotAllowedError``
  until the old one is removed.
- a dead peer: ``transfer`` raises ``nixlRemoteDisconnectError``; a transfer in flight when the
  peer dies makes ``check_xfer_state`` raise it (every call after, too).  A stopped peer leaves
  transfers ``PROC`` forever.  ``release_xfer_handle`` of a ``PROC`` transfer cancels it.
- without a progress thread (``enable_prog_thread=False``) a transfer completes only after the
  *target* agent has been progressed (``get_new_notifs``, ``check_xfer_state``, ``transfer``) since
  it was posted, and a standalone notification to a peer not yet connected to (no finished
  transfer) leaves only when the *sender* is progressed again.

Knobs (``agent.knobs``, a ``FakeNixlKnobs``) act on the agent that initiates transfers; the
target-side switches are ``agent.kill()``, ``agent.stop()`` and ``agent.resume()``.
The fake is stricter than the real one in one place: using a released handle raises
``nixlInvalidParamError`` (the real one reads freed memory).
"""

# ruff: noqa: B006  (list defaults mirror the real nixl_agent signatures; never mutated)
from __future__ import annotations

import ctypes
import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

DEFAULT_COMM_PORT = 8888
NIXL_INIT_AGENT = ""


# Same class names as nixl._bindings; all derive from Exception there too.
class nixlBackendError(Exception):
    pass


class nixlCancelledError(Exception):
    pass


class nixlInvalidParamError(Exception):
    pass


class nixlMismatchError(Exception):
    pass


class nixlNoTelemetryError(Exception):
    pass


class nixlNotAllowedError(Exception):
    pass


class nixlNotFoundError(Exception):
    pass


class nixlNotPostedError(Exception):
    pass


class nixlNotSupportedError(Exception):
    pass


class nixlRemoteDisconnectError(Exception):
    pass


class nixlRepostActiveError(Exception):
    pass


class nixlUnknownError(Exception):
    pass


_MEM_TYPES = {
    "DRAM": "DRAM",
    "VRAM": "VRAM",
    "FILE": "FILE",
    "BLOCK": "BLOCK",
    "OBJ": "OBJ",
    "cpu": "DRAM",
    "cuda": "VRAM",
}
# On a CPU machine the UCX backend prepares only host memory.
_TRANSFERABLE = {"DRAM"}
_OPS = {"READ": "READ", "WRITE": "WRITE"}
_MD_MAGIC = b"FAKENIXL\x01"
_LOCK = threading.RLock()
_incarnations = itertools.count(1)


@dataclass
class FakeNixlKnobs:
    """Fault and timing knobs for the transfers an agent initiates.

    cycles_before_done: ``transfer`` returns PROC and ``check_xfer_state`` returns PROC this many
        times before the transfer completes (0: ``transfer`` itself may return DONE).
    fail_transfers: int = the next N posted transfers end ERR; True = all; or a predicate
        ``f(handle) -> bool`` called at post time.  A failed transfer copies only its first half
        of descriptors (a torn transfer) and sends no notification.
    lose_notifs: int = the next N notifications (transfer or standalone) vanish; True = all.
    peer_gone: True or a collection of remote names treated as dead (disconnect errors).
    peer_stopped: True or a collection of remote names treated as stopped (PROC forever).
    """

    cycles_before_done: int = 0
    fail_transfers: Union[int, bool, Callable[[Any], bool]] = 0
    lose_notifs: Union[int, bool] = 0
    peer_gone: Union[bool, frozenset, set, list, tuple] = False
    peer_stopped: Union[bool, frozenset, set, list, tuple] = False


def _matches(flag, name: str) -> bool:
    if isinstance(flag, bool):
        return flag
    return bool(flag) and name in flag


def _take(knobs: FakeNixlKnobs, attr: str, arg=None) -> bool:
    """Consume one unit of a bool / count / predicate knob; True means 'apply the fault'."""
    value = getattr(knobs, attr)
    if isinstance(value, bool):
        return value
    if callable(value):
        return bool(value(arg))
    if value > 0:
        setattr(knobs, attr, value - 1)
        return True
    return False


class _Registry:
    """Live fake agents of this process, by name."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeNixlAgent] = {}

    def get(self, name: str) -> Optional[FakeNixlAgent]:
        with _LOCK:
            return self.agents.get(name)

    def reset(self) -> None:
        with _LOCK:
            self.agents.clear()


registry = _Registry()


class nixl_agent_config:
    """Same constructor as the real nixl_agent_config."""

    def __init__(
        self,
        enable_prog_thread: bool = True,
        enable_listen_thread: bool = False,
        listen_port: int = DEFAULT_COMM_PORT,
        capture_telemetry: bool = False,
        num_threads: int = 0,
        backends: list[str] = ["UCX"],
        sync_mode=None,
    ):
        self.backends = backends
        self.enable_pthread = enable_prog_thread
        self.enable_listen = enable_listen_thread
        self.port = listen_port
        self.capture_telemetry = capture_telemetry
        self.num_threads = num_threads
        self.sync_mode = sync_mode


FakeNixlAgentConfig = fake_nixl_agent_config = nixl_agent_config


class nixlXferDList:
    """Transfer descriptor list: rows of (addr, len, dev_id)."""

    _width = 3

    def __init__(self, mem_type: str, descs) -> None:
        self._type = mem_type
        self._descs = [self._row(d) for d in descs]

    def _row(self, d) -> tuple:
        return (int(d[0]), int(d[1]), int(d[2]))

    def descCount(self) -> int:
        return len(self._descs)

    def isEmpty(self) -> bool:
        return not self._descs

    def getType(self) -> str:
        return self._type

    def __getitem__(self, i: int) -> tuple:
        return self._descs[i]


class nixlRegDList(nixlXferDList):
    """Registration descriptor list: rows of (addr, len, dev_id, meta bytes)."""

    def _row(self, d) -> tuple:
        meta = d[3] if len(d) > 3 else b""
        return (int(d[0]), int(d[1]), int(d[2]), meta.encode() if isinstance(meta, str) else bytes(meta))


class nixlXferTelemetry:
    def __init__(self, startTime=0, postDuration=0, xferDuration=0, totalBytes=0, descCount=0):
        self.startTime = startTime
        self.postDuration = postDuration
        self.xferDuration = xferDuration
        self.totalBytes = totalBytes
        self.descCount = descCount


class nixl_prepped_dlist_handle:
    __slots__ = ("_agent", "_descs", "_mem", "_remote", "_epoch", "_released")

    def __init__(self, agent, descs, mem, remote, epoch) -> None:
        self._agent = agent
        self._descs = descs  # list of (addr, len, dev)
        self._mem = mem
        self._remote = remote  # None = local side; a name (maybe our own) = remote/loopback side
        self._epoch = epoch
        self._released = False

    def __repr__(self) -> str:
        return f"nixl_prepped_dlist_handle(0x{id(self):x}, released={self._released})"

    def release(self) -> None:
        self._released = True


class nixl_xfer_handle:
    __slots__ = (
        "_agent",
        "op",
        "pairs",
        "remote",
        "epoch",
        "notif_msg",
        "state",
        "countdown",
        "posted_progress",
        "fail",
        "_released",
        "telemetry",
    )

    def __init__(self, agent, op, pairs, remote, epoch, notif_msg) -> None:
        self._agent = agent
        self.op = op
        self.pairs = pairs  # list of ((local_addr, len), (remote_addr, len))
        self.remote = remote
        self.epoch = epoch
        self.notif_msg = notif_msg
        self.state = "INIT"  # INIT, PROC, DONE, ERR, DISC (peer died in flight)
        self.countdown = 0
        self.posted_progress = 0
        self.fail = False
        self._released = False
        self.telemetry = nixlXferTelemetry()

    def __repr__(self) -> str:
        return f"nixl_xfer_handle(0x{id(self):x}, released={self._released})"

    def release(self) -> None:
        # Releasing a transfer in flight cancels it, as the real one does for UCX.
        self._released = True


def _is_torch_tensor(obj) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_row(t) -> Optional[tuple]:
    if not t.is_contiguous():
        return None
    dev = t.get_device()
    mem = "DRAM" if dev == -1 else "VRAM"
    return mem, (t.data_ptr(), t.numel() * t.element_size(), max(dev, 0))


def _as_bytes(msg) -> bytes:
    return msg.encode() if isinstance(msg, str) else bytes(msg)


def _as_name(name) -> str:
    return name.decode() if isinstance(name, (bytes, bytearray)) else str(name)


def _within(regions, mem: str, addr: int, length: int, dev: int) -> bool:
    for r_mem, r_addr, r_len, r_dev in regions:
        if r_mem == mem and r_dev == dev and r_addr <= addr and addr + length <= r_addr + r_len:
            return True
    return False


class _Remote:
    __slots__ = ("name", "incarnation", "regions", "epoch")

    def __init__(self, name, incarnation, regions, epoch) -> None:
        self.name = name
        self.incarnation = incarnation
        self.regions = regions
        self.epoch = epoch


class FakeNixlAgent:
    """Mirrors nixl_agent; see the module docstring for what is modelled."""

    def __init__(
        self,
        agent_name: str,
        nixl_conf: Optional[nixl_agent_config] = None,
        instantiate_all: bool = False,
        *,
        knobs: Optional[FakeNixlKnobs] = None,
    ):
        conf = nixl_conf or nixl_agent_config()
        self.name = agent_name
        self.knobs = knobs if knobs is not None else FakeNixlKnobs()
        self.notifs: dict[str, list[bytes]] = {}
        self.backends = {b: i for i, b in enumerate(conf.backends)}
        self.dead = False
        self.stopped = False
        self._needs_progress = not conf.enable_pthread
        self._telemetry = conf.capture_telemetry
        self._incarnation = next(_incarnations)
        self._regions: list[tuple[str, int, int, int]] = []
        self._remotes: dict[str, _Remote] = {}
        self._epochs: dict[str, int] = {}
        self._inbox: list[tuple[str, bytes]] = []
        self._outbox: list[tuple[str, bytes]] = []  # first-contact notifications awaiting our progress
        self._connected: set[str] = set()
        self._progress = 0
        with _LOCK:
            registry.agents[agent_name] = self

    # ---- test-side switches (the peer's view of itself) ----
    def kill(self) -> None:
        """This agent's process 'dies': peers get disconnect errors."""
        with _LOCK:
            self.dead = True
            if registry.agents.get(self.name) is self:
                del registry.agents[self.name]

    def stop(self) -> None:
        """This agent's process is 'stopped' (SIGSTOP): transfers to it stay PROC."""
        self.stopped = True

    def resume(self) -> None:
        self.stopped = False

    # ---- descriptors and registration ----
    def get_reg_descs(self, descs, mem_type: Optional[str] = None) -> Optional[nixlRegDList]:
        if isinstance(descs, nixlRegDList):
            return descs
        if isinstance(descs, nixlXferDList):
            return None
        if isinstance(descs, np.ndarray):
            if mem_type is None or descs.ndim != 2 or descs.shape[1] != 3:
                return None
            return nixlRegDList(_MEM_TYPES[mem_type], [(*row, b"") for row in descs.tolist()])
        if _is_torch_tensor(descs):
            row = _tensor_row(descs)
            return None if row is None else nixlRegDList(row[0], [(*row[1], b"")])
        if isinstance(descs[0], tuple):
            if mem_type is None or len(descs[0]) != 4:
                return None
            return nixlRegDList(_MEM_TYPES[mem_type], descs)
        if _is_torch_tensor(descs[0]):
            rows = [_tensor_row(t) for t in descs]
            if any(r is None or r[0] != rows[0][0] for r in rows):
                return None
            return nixlRegDList(rows[0][0], [(*r[1], b"") for r in rows])
        return None

    def get_xfer_descs(self, descs, mem_type: Optional[str] = None) -> Optional[nixlXferDList]:
        if isinstance(descs, nixlRegDList):
            return None
        if isinstance(descs, nixlXferDList):
            return descs
        if isinstance(descs, np.ndarray):
            if mem_type is None or descs.ndim != 2 or descs.shape[1] != 3:
                return None
            return nixlXferDList(_MEM_TYPES[mem_type], descs.tolist())
        if _is_torch_tensor(descs):
            row = _tensor_row(descs)
            return None if row is None else nixlXferDList(row[0], [row[1]])
        if isinstance(descs[0], tuple):
            if mem_type is None or len(descs[0]) != 3:
                return None
            return nixlXferDList(_MEM_TYPES[mem_type], descs)
        if _is_torch_tensor(descs[0]):
            rows = [_tensor_row(t) for t in descs]
            if any(r is None or r[0] != rows[0][0] for r in rows):
                return None
            return nixlXferDList(rows[0][0], [r[1] for r in rows])
        return None

    def register_memory(
        self, reg_list, mem_type: Optional[str] = None, backends: list[str] = []
    ) -> nixlRegDList:
        reg_descs = self.get_reg_descs(reg_list, mem_type)
        if reg_descs is None:
            raise TypeError("registerMem(): incompatible function arguments (descs is None)")
        with _LOCK:
            for addr, length, dev, _meta in reg_descs._descs:
                self._regions.append((reg_descs._type, addr, length, dev))
        return reg_descs

    def deregister_memory(self, dereg_list: nixlRegDList, backends: list[str] = []) -> None:
        with _LOCK:
            for addr, length, dev, _meta in dereg_list._descs:
                key = (dereg_list._type, addr, length, dev)
                if key in self._regions:
                    self._regions.remove(key)

    # ---- metadata ----
    def get_agent_metadata(self) -> bytes:
        with _LOCK:
            body = {"name": self.name, "inc": self._incarnation, "regions": [list(r) for r in self._regions]}
        return _MD_MAGIC + json.dumps(body).encode()

    def add_remote_agent(self, metadata: bytes) -> bytes:
        raw = metadata.encode() if isinstance(metadata, str) else bytes(metadata)
        if not raw.startswith(_MD_MAGIC):
            raise nixlMismatchError("NIXL_ERR_MISMATCH")
        try:
            body = json.loads(raw[len(_MD_MAGIC) :])
            name, inc = str(body["name"]), int(body["inc"])
            regions = [(str(m), int(a), int(n), int(d)) for m, a, n, d in body["regions"]]
        except (ValueError, KeyError, TypeError) as e:
            raise nixlMismatchError("NIXL_ERR_MISMATCH") from e
        with _LOCK:
            old = self._remotes.get(name)
            if old is not None and old.incarnation != inc:
                # Another agent under a name already loaded (a peer restarted under the same
                # name): the real UCX backend refuses its connection info until the old one is
                # removed with remove_remote_agent.
                raise nixlNotAllowedError("NIXL_ERR_NOT_ALLOWED")
            epoch = self._epochs.get(name, 0)
            self._remotes[name] = _Remote(name, inc, regions, epoch)
        return name.encode()

    def remove_remote_agent(self, agent: str) -> None:
        name = _as_name(agent)
        with _LOCK:
            if self._remotes.pop(name, None) is not None:
                self._epochs[name] = self._epochs.get(name, 0) + 1

    def check_remote_metadata(self, agent: str, descs=None) -> bool:
        return _as_name(agent) in self._remotes

    def make_connection(self, remote_agent: str, backends: list[str] = []) -> None:
        name = _as_name(remote_agent)
        if name not in self._remotes:
            raise nixlNotFoundError("NIXL_ERR_NOT_FOUND")
        if self._gone(name):
            raise nixlRemoteDisconnectError("NIXL_ERR_REMOTE_DISCONNECT")

    # ---- preparation ----
    def prep_xfer_dlist(
        self,
        agent_name: str,
        xfer_list,
        mem_type: Optional[str] = None,
        backends: list[str] = [],
    ) -> nixl_prepped_dlist_handle:
        if isinstance(xfer_list, np.ndarray) and xfer_list.ndim == 2 and xfer_list.shape[1] == 5:
            if mem_type is None:
                raise ValueError("Please specify a mem type for strided descriptors")
            rows = [
                (int(a) + k * int(s), int(n), int(d))
                for a, n, d, s, c in xfer_list.tolist()
                for k in range(int(c))
            ]
            descs = nixlXferDList(_MEM_TYPES[mem_type], rows)
        else:
            descs = self.get_xfer_descs(xfer_list, mem_type)
        if descs is None:
            raise TypeError("prepXferDlist(): incompatible function arguments (descs is None)")
        name = _as_name(agent_name)
        is_local = name in ("", "NIXL_INIT_AGENT")
        with _LOCK:
            if is_local or name == self.name:
                regions, epoch = self._regions, 0
            elif name in self._remotes:
                regions, epoch = self._remotes[name].regions, self._remotes[name].epoch
            else:
                raise nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: metadata for remote agent {name!r} not found")
            if descs._type not in _TRANSFERABLE:
                raise nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: no backend for mem type {descs._type}")
            for addr, length, dev in descs._descs:
                if length and not _within(regions, descs._type, addr, length, dev):
                    raise nixlNotFoundError("NIXL_ERR_NOT_FOUND: descriptor outside registered memory")
            return nixl_prepped_dlist_handle(
                self, list(descs._descs), descs._type, None if is_local else name, epoch
            )

    def make_prepped_xfer(
        self,
        operation: str,
        local_xfer_side: nixl_prepped_dlist_handle,
        local_indices,
        remote_xfer_side: nixl_prepped_dlist_handle,
        remote_indices,
        notif_msg: bytes = b"",
        backends: list[str] = [],
        skip_desc_merge: bool = False,
    ) -> nixl_xfer_handle:
        op = _OPS[operation]
        lside, rside = local_xfer_side, remote_xfer_side
        for side in (lside, rside):
            if side._released or side._agent is not self:
                raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: released or foreign dlist handle")
        if lside._remote is not None or rside._remote is None:
            raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: invalid sides")
        lidx = [int(i) for i in np.asarray(local_indices).reshape(-1).tolist()]
        ridx = [int(i) for i in np.asarray(remote_indices).reshape(-1).tolist()]
        if not lidx or len(lidx) != len(ridx):
            raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: different number of indices")
        pairs = []
        for li, ri in zip(lidx, ridx):
            if not 0 <= li < len(lside._descs) or not 0 <= ri < len(rside._descs):
                raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: index out of range")
            la, ln, _ = lside._descs[li]
            ra, rn, _ = rside._descs[ri]
            if ln != rn:
                raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: length mismatch")
            pairs.append(((la, ln), (ra, rn)))
        remote = rside._remote
        with _LOCK:
            self._check_fresh(remote, rside._epoch)
        return nixl_xfer_handle(self, op, pairs, remote, rside._epoch, _as_bytes(notif_msg))

    def initialize_xfer(
        self,
        operation: str,
        local_descs: nixlXferDList,
        remote_descs: nixlXferDList,
        remote_agent: str,
        notif_msg: bytes = b"",
        backends: list[str] = [],
    ) -> nixl_xfer_handle:
        op = _OPS[operation]
        if not isinstance(local_descs, nixlXferDList) or not isinstance(remote_descs, nixlXferDList):
            raise TypeError("createXferReq(): incompatible function arguments")
        name = _as_name(remote_agent)
        with _LOCK:
            if name != self.name and name not in self._remotes:
                raise nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: metadata for remote agent {name!r} not found")
            rregions = self._regions if name == self.name else self._remotes[name].regions
            epoch = 0 if name == self.name else self._remotes[name].epoch
            if local_descs.descCount() != remote_descs.descCount() or local_descs.isEmpty():
                raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: descriptor count mismatch")
            rows = list(zip(local_descs._descs, remote_descs._descs))
            if any(ln != rn for (_, ln, _), (_, rn, _) in rows):
                raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: length mismatch")
            for (la, ln, ld), (ra, rn, rd) in rows:
                if not _within(self._regions, local_descs._type, la, ln, ld) or not _within(
                    rregions, remote_descs._type, ra, rn, rd
                ):
                    raise nixlNotFoundError("NIXL_ERR_NOT_FOUND: no backend had the required registrations")
            pairs = [((la, ln), (ra, rn)) for (la, ln, _), (ra, rn, _) in rows]
        return nixl_xfer_handle(self, op, pairs, name, epoch, _as_bytes(notif_msg))

    # ---- transfer ----
    def transfer(self, handle: nixl_xfer_handle, notif_msg: bytes = b"") -> str:
        with _LOCK:
            self._check_handle(handle)
            self._progress_once()
            if handle.state == "PROC":
                raise nixlRepostActiveError("NIXL_ERR_REPOST_ACTIVE")
            self._check_fresh(handle.remote, handle.epoch)
            if self._gone(handle.remote):
                raise nixlRemoteDisconnectError("NIXL_ERR_REMOTE_DISCONNECT")
            if notif_msg:
                handle.notif_msg = _as_bytes(notif_msg)
            target = self._target(handle.remote)
            handle.state = "PROC"
            handle.countdown = max(0, int(self.knobs.cycles_before_done))
            handle.posted_progress = target._progress if target is not None else 0
            handle.fail = _take(self.knobs, "fail_transfers", handle)
            handle.telemetry = nixlXferTelemetry(startTime=int(time.monotonic() * 1e6))
            self._try_complete(handle)
            return "PROC" if handle.state == "PROC" else handle.state

    def check_xfer_state(self, handle: nixl_xfer_handle) -> str:
        with _LOCK:
            self._check_handle(handle)
            self._progress_once()
            if handle.state == "PROC":
                if self._gone(handle.remote):
                    handle.state = "DISC"
                elif handle.countdown > 0:
                    handle.countdown -= 1
                    return "PROC"
                else:
                    self._try_complete(handle)
            if handle.state == "DISC":
                raise nixlRemoteDisconnectError("NIXL_ERR_REMOTE_DISCONNECT")
            if handle.state == "INIT":
                raise nixlNotPostedError("NIXL_ERR_NOT_POSTED")
            return handle.state

    def get_xfer_telemetry(self, handle: nixl_xfer_handle) -> nixlXferTelemetry:
        if not self._telemetry:
            raise nixlNoTelemetryError("NIXL_ERR_NO_TELEMETRY")
        return handle.telemetry

    def query_xfer_backend(self, handle: nixl_xfer_handle) -> str:
        return next(iter(self.backends), "UCX")

    def release_xfer_handle(self, handle: nixl_xfer_handle) -> None:
        handle.release()

    def release_dlist_handle(self, handle: nixl_prepped_dlist_handle) -> None:
        handle.release()

    # ---- notifications ----
    def send_notif(self, remote_agent_name: str, notif_msg: bytes, backend: Optional[str] = None) -> None:
        name = _as_name(remote_agent_name)
        with _LOCK:
            if name != self.name and name not in self._remotes:
                raise nixlNotFoundError("NIXL_ERR_NOT_FOUND: no backend could send the notification")
            if self._gone(name):
                raise nixlRemoteDisconnectError("NIXL_ERR_REMOTE_DISCONNECT")
            if _take(self.knobs, "lose_notifs"):
                return
            if self._needs_progress and name != self.name and name not in self._connected:
                # First contact without a progress thread: the connection (and the message) only
                # goes out once this agent is progressed again.
                self._outbox.append((name, _as_bytes(notif_msg)))
            else:
                self._deliver(name, _as_bytes(notif_msg), lossy=False)

    def get_new_notifs(self, backends: list[str] = []) -> dict[str, list[bytes]]:
        with _LOCK:
            self._progress_once()
            out: dict[str, list[bytes]] = {}
            for sender, msg in self._inbox:
                out.setdefault(sender, []).append(msg)
            self._inbox.clear()
            return out

    def update_notifs(self, backends: list[str] = []) -> dict[str, list[bytes]]:
        for sender, msgs in self.get_new_notifs().items():
            self.notifs.setdefault(sender, []).extend(msgs)
        return self.notifs

    def check_remote_xfer_done(
        self,
        remote_agent_name: str,
        lookup_tag: bytes,
        backends: list[str] = [],
        tag_is_prefix=True,
    ) -> bool:
        msgs = self.update_notifs().get(remote_agent_name, [])
        for msg in msgs:
            if (msg.startswith(lookup_tag)) if tag_is_prefix else (lookup_tag in msg):
                msgs.remove(msg)
                return True
        return False

    # ---- internals (callers hold _LOCK) ----
    def _progress_once(self) -> None:
        self._progress += 1
        for name, msg in self._outbox:
            self._connected.add(name)
            self._deliver(name, msg, lossy=False)
        self._outbox.clear()

    def _check_handle(self, handle: nixl_xfer_handle) -> None:
        if handle._released or handle._agent is not self:
            raise nixlInvalidParamError("NIXL_ERR_INVALID_PARAM: released or foreign xfer handle")

    def _check_fresh(self, remote: str, epoch: int) -> None:
        if remote == self.name:
            return
        rec = self._remotes.get(remote)
        if rec is None or rec.epoch != epoch:
            raise nixlNotFoundError(f"NIXL_ERR_NOT_FOUND: remote agent {remote!r} was invalidated")

    def _target(self, remote: str) -> Optional[FakeNixlAgent]:
        if remote == self.name:
            return self
        agent = registry.agents.get(remote)
        rec = self._remotes.get(remote)
        if agent is None or agent.dead or rec is None or agent._incarnation != rec.incarnation:
            return None
        return agent

    def _gone(self, remote: str) -> bool:
        if remote == self.name:
            return False
        return _matches(self.knobs.peer_gone, remote) or self._target(remote) is None

    def _try_complete(self, handle: nixl_xfer_handle) -> None:
        if handle.countdown > 0:
            return
        target = self._target(handle.remote)
        if target is None:
            return
        if target.stopped or _matches(self.knobs.peer_stopped, handle.remote):
            return
        if target is not self and target._needs_progress and target._progress <= handle.posted_progress:
            return
        pairs = handle.pairs[: len(handle.pairs) // 2] if handle.fail else handle.pairs
        for (laddr, length), (raddr, _) in pairs:
            if handle.op == "READ":
                ctypes.memmove(laddr, raddr, length)
            else:
                ctypes.memmove(raddr, laddr, length)
        tel = handle.telemetry
        tel.xferDuration = int(time.monotonic() * 1e6) - tel.startTime
        tel.totalBytes = sum(p[0][1] for p in pairs)
        tel.descCount = _merged_count(pairs)
        if handle.fail:
            handle.state = "ERR"
            return
        handle.state = "DONE"
        self._connected.add(handle.remote)
        if handle.notif_msg:
            self._deliver(handle.remote, handle.notif_msg)

    def _deliver(self, remote: str, msg: bytes, lossy: bool = True) -> None:
        target = self._target(remote)
        if target is None or (lossy and _take(self.knobs, "lose_notifs")):
            return
        target._inbox.append((self.name, msg))


def _merged_count(pairs) -> int:
    """How many descriptors remain after merging runs contiguous on both sides."""
    count, prev = 0, None
    for (la, ln), (ra, _) in pairs:
        if prev is None or la != prev[0] or ra != prev[1]:
            count += 1
        prev = (la + ln, ra + ln)
    return count


nixl_agent = FakeNixlAgent
