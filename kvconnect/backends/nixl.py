"""P/D transfer over NIXL: :class:`NixlTransport` wraps one ``nixl_agent``; the scheduler and
worker are the shared P/D core (:mod:`kvconnect.pd`) bound to it.

The agent class is injected (``agent_factory``, ``config_factory``); by default the real
``nixl_cu12._api`` is imported lazily, and a missing install is a clear
:class:`~kvconnect.errors.BackendUnavailableError`. Agents run without NIXL's own progress
thread by default (it spins a core): kvconnect's progress thread progresses both roles.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from kvconnect.api import EngineInfo
from kvconnect.config import NixlConfig
from kvconnect.errors import BackendUnavailableError, HandshakeError, TransferError
from kvconnect.pd.scheduler import PDScheduler
from kvconnect.pd.transport import Op, Region, Status, Transport
from kvconnect.pd.worker import PDWorker
from kvconnect.ucx_env import apply_ucx_defaults

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install nixl-cu12 nixl"


class NixlBlob(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """What :meth:`NixlTransport.metadata` publishes: the agent's metadata plus where its KV
    lives. NIXL looks a remote descriptor up among the peer's registrations *of the list's memory
    type* (and device), so a host-memory consumer reading a GPU producer must name the peer's
    ``VRAM`` and GPU id, not its own ``DRAM``."""

    mem: str
    dev: int
    agent: bytes


_BLOB_DECODER = msgspec.msgpack.Decoder(NixlBlob)


def load_nixl() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(nixl_agent, nixl_agent_config)`` of the installed NIXL, or BackendUnavailableError.
    Applies kvconnect's UCX defaults first (:mod:`kvconnect.ucx_env`)."""
    apply_ucx_defaults()
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        try:
            from nixl._api import nixl_agent, nixl_agent_config  # type: ignore[no-redef]
        except ImportError as e:
            raise BackendUnavailableError(
                f"the nixl backend needs NIXL, which is not installed: {INSTALL_HINT} ({e})"
            ) from e
    return nixl_agent, nixl_agent_config


class NixlTransport(Transport):
    name = "nixl"

    def __init__(
        self,
        agent_name: str,
        backends: Sequence[str] = ("UCX",),
        progress_thread: bool = False,
        merge_runs: bool = True,
        agent_factory: Callable[..., Any] | None = None,
        config_factory: Callable[..., Any] | None = None,
    ) -> None:
        if agent_factory is None:
            agent_factory, default_conf = load_nixl()
            config_factory = config_factory or default_conf
        elif config_factory is None:
            config_factory = getattr(sys.modules.get(agent_factory.__module__), "nixl_agent_config", None)
        apply_ucx_defaults()  # also where the agent class was injected: UCX reads them at the first agent
        conf = (
            config_factory(enable_prog_thread=progress_thread, backends=list(backends))
            if config_factory
            else None
        )
        self._agent = agent_factory(agent_name, conf)
        self._name = agent_name
        self._skip_merge = not merge_runs
        self._mem = "DRAM"
        self._dev = 0
        self._local_bases = np.zeros(0, np.int64)
        self._peer_bases: dict[str, np.ndarray] = {}
        #: ``(memory type, device id)`` of each peer's registered KV.
        self._peer_mem: dict[str, tuple[str, int]] = {}
        self._reg: Any = None

    @property
    def agent_name(self) -> str:
        return self._name

    @property
    def agent(self) -> Any:
        return self._agent

    def register(self, regions: Sequence[Region], device: str = "cpu") -> None:
        if device.startswith("cuda"):
            self._mem, self._dev = "VRAM", int(device.partition(":")[2] or 0)
        rows = [(int(a), int(n), self._dev, "") for a, n in regions]
        try:
            self._reg = self._agent.register_memory(rows, self._mem)
        except Exception as e:
            raise TransferError(f"NIXL could not register {len(rows)} KV regions ({self._mem}): {e}") from e
        self._local_bases = np.asarray([a for a, _ in regions], dtype=np.int64)

    def metadata(self) -> bytes:
        return msgspec.msgpack.encode(NixlBlob(self._mem, self._dev, bytes(self._agent.get_agent_metadata())))

    def add_peer(self, metadata: bytes, regions: Sequence[Region]) -> str:
        try:
            blob = _BLOB_DECODER.decode(metadata)
        except (msgspec.DecodeError, TypeError) as e:
            raise HandshakeError(
                f"NIXL refused the peer's agent metadata: not a kvconnect NIXL blob ({e})"
            ) from e
        if blob.mem not in ("DRAM", "VRAM"):
            raise HandshakeError(
                f"NIXL refused the peer's agent metadata: memory type {blob.mem!r} is not DRAM or VRAM"
            )
        try:
            name = self._agent.add_remote_agent(blob.agent)
        except Exception as e:
            raise HandshakeError(f"NIXL refused the peer's agent metadata: {type(e).__name__}: {e}") from e
        peer = name.decode() if isinstance(name, (bytes, bytearray)) else str(name)
        self._peer_bases[peer] = np.asarray([a for a, _ in regions], dtype=np.int64)
        self._peer_mem[peer] = (blob.mem, blob.dev)
        return peer

    def remove_peer(self, peer: str) -> None:
        self._peer_bases.pop(peer, None)
        self._peer_mem.pop(peer, None)
        try:
            self._agent.remove_remote_agent(peer)
        except Exception:
            logger.debug("removing NIXL peer %s failed", peer, exc_info=True)

    def prepare(self, peer: str | None, descs: np.ndarray) -> Any:
        bases = self._local_bases if peer is None else self._peer_bases.get(peer)
        if bases is None:
            raise TransferError(f"NIXL peer {peer!r} is not loaded")
        mem, dev = (self._mem, self._dev) if peer is None else self._peer_mem[peer]
        descs = np.asarray(descs, dtype=np.int64).reshape(-1, 3)
        rows = np.empty((len(descs), 3), dtype=np.int64)
        rows[:, 0] = bases[descs[:, 0]] + descs[:, 1]
        rows[:, 1] = descs[:, 2]
        rows[:, 2] = dev
        try:
            return self._agent.prep_xfer_dlist("NIXL_INIT_AGENT" if peer is None else peer, rows, mem)
        except Exception as e:
            raise TransferError(
                f"NIXL could not prepare {len(rows)} {mem} descriptors for {peer or 'local'}: {e}"
            ) from e

    def release_prepared(self, prepared: Any) -> None:
        self._agent.release_dlist_handle(prepared)

    def start(self, op: Op, peer: str, local: Any, local_idx: np.ndarray, remote: Any,
              remote_idx: np.ndarray, notify: bytes | None = None) -> Any:
        try:
            h = self._agent.make_prepped_xfer(
                op.value, local, local_idx, remote, remote_idx, notify or b"",
                skip_desc_merge=self._skip_merge,
            )
        except Exception as e:
            raise TransferError(
                f"NIXL could not make a {op.value} with {peer}: {type(e).__name__}: {e}"
            ) from e
        try:
            state = self._agent.transfer(h)
        except Exception as e:
            self.release(h)
            raise TransferError(
                f"NIXL {op.value} with {peer} failed to start: {type(e).__name__}: {e}"
            ) from e
        if state == "ERR":
            self.release(h)
            raise TransferError(f"NIXL {op.value} with {peer} failed to start")
        return h

    def poll(self, handle: Any) -> Status:
        try:
            state = self._agent.check_xfer_state(handle)
        except Exception as e:
            logger.debug("NIXL transfer failed: %s: %s", type(e).__name__, e)
            return Status.FAILED
        if state == "DONE":
            return Status.DONE
        if state == "PROC":
            return Status.BUSY
        return Status.FAILED

    def release(self, handle: Any) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:
            logger.debug("NIXL could not release a transfer handle", exc_info=True)

    def notify(self, peer: str, message: bytes) -> None:
        try:
            self._agent.send_notif(peer, message)
        except Exception as e:
            raise TransferError(f"NIXL could not notify {peer}: {type(e).__name__}: {e}") from e

    def notifications(self) -> list[tuple[str, bytes]]:
        try:
            notifs = self._agent.get_new_notifs()
        except Exception:
            logger.debug("NIXL get_new_notifs failed", exc_info=True)
            return []
        if not notifs:
            return []
        return [(str(sender), msg) for sender, msgs in notifs.items() for msg in msgs]

    def close(self) -> None:
        for peer in list(self._peer_bases):
            self.remove_peer(peer)
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception:
                logger.debug("NIXL deregister failed", exc_info=True)
            self._reg = None


class NixlScheduler(PDScheduler):
    """P/D scheduler half for NIXL (the scheduler needs no transport)."""


class NixlWorker(PDWorker):
    """P/D worker half over NIXL. ``agent_factory`` / ``config_factory`` replace the real
    ``nixl_agent`` / ``nixl_agent_config`` (tests pass the fake)."""

    def __init__(
        self,
        config: NixlConfig,
        engine: EngineInfo,
        agent_factory: Callable[..., Any] | None = None,
        config_factory: Callable[..., Any] | None = None,
    ) -> None:
        if agent_factory is None:
            agent_factory, default_conf = load_nixl()  # fail at construction, not at registration
            config_factory = config_factory or default_conf

        def make(agent_name: str) -> NixlTransport:
            return NixlTransport(
                agent_name,
                backends=config.nixl_backends,
                progress_thread=config.nixl_progress_thread,
                merge_runs=config.merge_runs,
                agent_factory=agent_factory,
                config_factory=config_factory,
            )

        super().__init__(config, engine, make)
