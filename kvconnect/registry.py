"""Backend registry: backend name -> its scheduler and worker classes, imported lazily so that
selecting one backend never imports another's dependencies."""

from __future__ import annotations

import importlib
from typing import Any

from kvconnect.api import EngineInfo, SchedulerConnector, WorkerConnector
from kvconnect.config import KVConnectConfig, backend_name
from kvconnect.telemetry import StatNames

#: name -> (module, scheduler class, worker class). A backend class is built as ``cls(config, engine)``.
BACKENDS: dict[str, tuple[str, str, str]] = {
    "nixl": ("kvconnect.backends.nixl", "NixlScheduler", "NixlWorker"),
    "mori": ("kvconnect.backends.mori", "MoriScheduler", "MoriWorker"),
    "cpu_offload": ("kvconnect.backends.cpu_offload", "CpuOffloadScheduler", "CpuOffloadWorker"),
    "mooncake": ("kvconnect.backends.mooncake", "MooncakeScheduler", "MooncakeWorker"),
}


#: name -> module whose ``STATS`` (:class:`kvconnect.telemetry.StatNames`) declares every stat the
#: backend reports (light modules: the engine's metrics process imports them).
STATS: dict[str, str] = {
    "nixl": "kvconnect.pd.stats",
    "mori": "kvconnect.pd.stats",
    "cpu_offload": "kvconnect.backends.cpu_offload.stats",
    "mooncake": "kvconnect.backends.mooncake.stats",
}


def stat_names(name: str) -> StatNames:
    try:
        module = STATS[name]
    except KeyError:
        raise KeyError(f"backend {name!r} declares no stats (kvconnect.registry.STATS)") from None
    return importlib.import_module(module).STATS


def _load(name: str, half: int) -> type:
    try:
        module, *classes = BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from None
    return getattr(importlib.import_module(module), classes[half])


def scheduler_class(name: str) -> type[SchedulerConnector]:
    return _load(name, 0)


def worker_class(name: str) -> type[WorkerConnector]:
    return _load(name, 1)


def create_backend_scheduler(backend_cfg: Any, engine: EngineInfo) -> SchedulerConnector:
    return scheduler_class(backend_name(backend_cfg))(backend_cfg, engine)


def create_backend_worker(backend_cfg: Any, engine: EngineInfo) -> WorkerConnector:
    return worker_class(backend_name(backend_cfg))(backend_cfg, engine)


def create_scheduler(cfg: KVConnectConfig, engine: EngineInfo) -> SchedulerConnector:
    """One backend is used directly; several are composed by the MultiConnector."""
    if len(cfg.backends) == 1:
        return create_backend_scheduler(cfg.backends[0], engine)
    from kvconnect.multi import MultiScheduler

    return MultiScheduler(cfg, engine)


def create_worker(cfg: KVConnectConfig, engine: EngineInfo) -> WorkerConnector:
    if len(cfg.backends) == 1:
        return create_backend_worker(cfg.backends[0], engine)
    from kvconnect.multi import MultiWorker

    return MultiWorker(cfg, engine)
