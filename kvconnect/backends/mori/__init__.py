"""P/D transfer over MoRI-IO (``mori.io``, ROCm/mori): :class:`MoriTransport` wraps one
``IOEngine``; the scheduler and worker are the shared P/D core (:mod:`kvconnect.pd`) bound to it.

The ``mori.io`` module is injected (``MoriWorker(..., mori=module)``; tests pass
``tests/fakes/fake_mori.py``); by default it is imported lazily when the worker is built, and a
missing install is a clear :class:`~kvconnect.errors.BackendUnavailableError`. MoRI is not on
PyPI: it is built from source on a ROCm machine.

Every wait is bounded by the config: ``handshake_timeout_s`` (side-channel handshake),
``transfer_timeout_s`` (each transfer, enforced by the transport as well as by the P/D core),
``lease_timeout_s`` (producer blocks), ``poll_interval_s`` / ``idle_poll_interval_s`` (the
progress thread sleeps between rounds; nothing spins, nothing blocks without a deadline).
"""

from __future__ import annotations

from types import ModuleType

from kvconnect.api import EngineInfo
from kvconnect.config import MoriConfig
from kvconnect.errors import BackendUnavailableError
from kvconnect.pd.scheduler import PDScheduler, advertised_host
from kvconnect.pd.worker import PDWorker

from .runs import batch_entries
from .transport import MoriBlob, MoriTransport

__all__ = [
    "INSTALL_HINT",
    "MoriBlob",
    "MoriScheduler",
    "MoriTransport",
    "MoriWorker",
    "batch_entries",
    "load_mori",
]

INSTALL_HINT = (
    "MoRI is not on PyPI; build it from source on a ROCm machine: "
    "git clone https://github.com/ROCm/mori && cd mori && pip install ."
)


def load_mori() -> ModuleType:
    """The installed ``mori.io`` module, or BackendUnavailableError saying how to install it."""
    try:
        import mori.io as mori_io
    except ImportError as e:
        raise BackendUnavailableError(
            f"the mori backend needs MoRI-IO (python module mori.io), which is not installed. "
            f"{INSTALL_HINT} ({e})"
        ) from e
    return mori_io


class MoriScheduler(PDScheduler):
    """P/D scheduler half for MoRI-IO (the scheduler needs no transport)."""


class MoriWorker(PDWorker):
    """P/D worker half over MoRI-IO. ``mori`` replaces the real ``mori.io`` module (tests pass
    the fake)."""

    def __init__(self, config: MoriConfig, engine: EngineInfo, mori: ModuleType | None = None) -> None:
        module = mori if mori is not None else load_mori()  # fail at construction, not at registration
        host = config.mori_host or advertised_host(config)
        port = config.mori_port + engine.dp_rank * engine.tp_size + engine.tp_rank if config.mori_port else 0

        def make(agent_name: str) -> MoriTransport:
            return MoriTransport(
                agent_name, module, host=host, port=port,
                qp_per_transfer=config.qp_per_transfer, post_batch_size=config.post_batch_size,
                num_worker_threads=config.num_worker_threads, poll_cq_mode=config.poll_cq_mode,
                transfer_timeout_s=config.transfer_timeout_s, merge_runs=config.merge_runs,
                secret=config.secret,
            )

        super().__init__(config, engine, make)
