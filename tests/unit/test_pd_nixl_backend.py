"""The NIXL backend wrapper: agent injection, agent configuration, and a clear error without NIXL."""

from __future__ import annotations

import sys

import pytest

from kvconnect.api import EngineInfo
from kvconnect.backends.nixl import NixlScheduler, NixlTransport, NixlWorker
from kvconnect.config import NixlConfig, parse_config
from kvconnect.errors import BackendUnavailableError, HandshakeError
from kvconnect.pd import PDScheduler, PDWorker
from kvconnect.registry import scheduler_class, worker_class
from tests.fakes import fake_nixl


def test_registry_resolves_the_pd_core_bound_to_nixl():
    assert issubclass(scheduler_class("nixl"), PDScheduler) and issubclass(worker_class("nixl"), PDWorker)
    assert NixlScheduler.supports_hybrid and NixlWorker.supports_hybrid


def test_missing_nixl_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl_cu12._api", None)
    monkeypatch.setitem(sys.modules, "nixl._api", None)
    with pytest.raises(BackendUnavailableError, match="pip install nixl-cu12 nixl"):
        NixlWorker(NixlConfig(), EngineInfo(engine_id="e"))


def test_agents_run_without_nixl_progress_thread_and_with_configured_backends():
    seen = {}

    def factory(name, conf):
        seen["conf"] = conf
        return fake_nixl.FakeNixlAgent(name, conf)

    cfg = parse_config({"backend": "nixl", "nixl_backends": ["UCX", "POSIX"]}).backends[0]
    NixlTransport("a1", cfg.nixl_backends, cfg.nixl_progress_thread, agent_factory=factory,
                  config_factory=fake_nixl.nixl_agent_config)
    assert seen["conf"].enable_pthread is False
    assert seen["conf"].backends == ["UCX", "POSIX"]
    fake_nixl.registry.reset()


def test_garbage_peer_metadata_is_a_handshake_error():
    t = NixlTransport("a2", agent_factory=fake_nixl.FakeNixlAgent, config_factory=fake_nixl.nixl_agent_config)
    with pytest.raises(HandshakeError, match="NIXL refused"):
        t.add_peer(b"not nixl metadata", [])
    fake_nixl.registry.reset()
