"""kvconnect: one engine-neutral KV-cache connector for vLLM and SGLang.

The names below are the API for Python code that embeds kvconnect (an engine adapter, a test
harness, a tool); everything else is internal and may change. Importing this package is cheap on
purpose (engines import it in every process): it pulls in neither torch, zmq nor any engine, and
each name is imported from its module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the engine-neutral connector API (kvconnect.api)
    "SchedulerConnector": "kvconnect.api",
    "WorkerConnector": "kvconnect.api",
    "EngineInfo": "kvconnect.api",
    "RequestView": "kvconnect.api",
    "ScheduledRequest": "kvconnect.api",
    "StepView": "kvconnect.api",
    "TransferResults": "kvconnect.api",
    # configuration
    "parse_config": "kvconnect.config",
    "KVConnectConfig": "kvconnect.config",
    "NixlConfig": "kvconnect.config",
    "MoriConfig": "kvconnect.config",
    "CpuOffloadConfig": "kvconnect.config",
    # building connectors from a config
    "create_scheduler": "kvconnect.registry",
    "create_worker": "kvconnect.registry",
    # errors: every deliberate one is a KVConnectError
    "KVConnectError": "kvconnect.errors",
    "ConfigError": "kvconnect.errors",
    "UnsupportedModelError": "kvconnect.errors",
    "LayoutError": "kvconnect.errors",
    "WireError": "kvconnect.errors",
    "HandshakeError": "kvconnect.errors",
    "PeerRefusedError": "kvconnect.errors",
    "CompatibilityError": "kvconnect.errors",
    "TransferError": "kvconnect.errors",
    "BackendUnavailableError": "kvconnect.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvconnect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
