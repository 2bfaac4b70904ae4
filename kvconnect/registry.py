"""Backend registry: backend name -> its scheduler and worker classes, imported lazily so that
selecting one backend never imports another's dependencies."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from kvconnect.api import EngineInfo, SchedulerConnector, WorkerConnector
from kvconnect.config import KVConnectConfig, backend_name
from kvconnect.errors import ConfigError
from kvconnect.multi import MultiScheduler, MultiWorker
from kvconnect.multi.metadata import build_children, check_composition, child_names
from kvconnect.telemetry import StatNames

T = TypeVar("T")

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
    """The stats backend ``name`` declares; :class:`ConfigError` for a backend with none."""
    try:
        module = STATS[name]
    except KeyError as e:
        raise ConfigError(f"backend {name!r} declares no stats; known: {sorted(STATS)}") from e
    return importlib.import_module(module).STATS


def _load(name: str, half: int) -> type:
    try:
        module, *classes = BACKENDS[name]
    except KeyError as e:
        raise ConfigError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}") from e
    return getattr(importlib.import_module(module), classes[half])


def scheduler_class(name: str) -> type[SchedulerConnector]:
    return _load(name, 0)


def worker_class(name: str) -> type[WorkerConnector]:
    return _load(name, 1)


def create_backend_scheduler(backend_cfg: Any, engine: EngineInfo) -> SchedulerConnector:
    return scheduler_class(backend_name(backend_cfg))(backend_cfg, engine)


def create_backend_worker(backend_cfg: Any, engine: EngineInfo) -> WorkerConnector:
    return worker_class(backend_name(backend_cfg))(backend_cfg, engine)


def _build_children(
    cfg: KVConnectConfig, engine: EngineInfo, create: Callable[[Any, EngineInfo], T]
) -> tuple[list[T], list[str], list[tuple[str, str]]]:
    """Every child of a composition, built in config order (see
    :func:`kvconnect.multi.metadata.build_children`); the composition is checked first, before
    anything holds a socket or a thread."""
    names = child_names([backend_name(b) for b in cfg.backends])
    check_composition(names)
    return build_children(create, cfg.backends, engine, names)


def create_scheduler(cfg: KVConnectConfig, engine: EngineInfo) -> SchedulerConnector:
    """One backend is used directly; several are built here and composed by the MultiConnector."""
    if len(cfg.backends) == 1:
        return create_backend_scheduler(cfg.backends[0], engine)
    children, names, refused = _build_children(cfg, engine, create_backend_scheduler)
    return MultiScheduler(children, engine, names, unsupported_model=cfg.unsupported_model,
                          load_rule=cfg.load_rule, refused=refused)


def create_worker(cfg: KVConnectConfig, engine: EngineInfo) -> WorkerConnector:
    """The worker half matching :func:`create_scheduler` (same children, same order, same names)."""
    if len(cfg.backends) == 1:
        return create_backend_worker(cfg.backends[0], engine)
    children, names, refused = _build_children(cfg, engine, create_backend_worker)
    return MultiWorker(children, engine, names, unsupported_model=cfg.unsupported_model, refused=refused)
