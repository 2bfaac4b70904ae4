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


def test_host_consumer_reads_a_gpu_peer_through_the_peers_memory_type_and_device(monkeypatch):
    """VRAM -> host: NIXL finds a remote descriptor only among the peer's registrations of the
    list's memory type and device, so the consumer must prepare the peer's list as VRAM on the
    peer's GPU. (The fake moves host bytes whatever the label; on a GPU machine UCX moves VRAM.)"""
    import numpy as np

    from kvconnect.pd.transport import Op, Status

    monkeypatch.setattr(fake_nixl, "_TRANSFERABLE", {"DRAM", "VRAM"})  # a CUDA-enabled UCX
    src = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    dst = np.zeros(4096, np.uint8)
    mk = dict(agent_factory=fake_nixl.FakeNixlAgent, config_factory=fake_nixl.nixl_agent_config)
    prod, cons = NixlTransport("gpu-prod", **mk), NixlTransport("host-cons", **mk)
    prod.register([(src.ctypes.data, src.nbytes)], "cuda:1")
    cons.register([(dst.ctypes.data, dst.nbytes)], "cpu")
    peer = cons.add_peer(prod.metadata(), [(src.ctypes.data, src.nbytes)])
    descs = np.array([(0, 0, 1024), (0, 2048, 2048)], np.int64)
    idx = np.arange(2)
    h = cons.start(Op.READ, peer, cons.prepare(None, descs), idx, cons.prepare(peer, descs), idx)
    for _ in range(1000):
        prod.notifications()
        if (st := cons.poll(h)) is not Status.BUSY:
            break
    assert st is Status.DONE
    assert np.array_equal(dst[:1024], src[:1024]) and np.array_equal(dst[2048:], src[2048:])
    assert not dst[1024:2048].any()
    cons.close()
    prod.close()
    fake_nixl.registry.reset()


def test_peer_blob_with_an_unknown_memory_type_is_a_handshake_error():
    import msgspec

    from kvconnect.backends.nixl import NixlBlob

    t = NixlTransport("a3", agent_factory=fake_nixl.FakeNixlAgent, config_factory=fake_nixl.nixl_agent_config)
    with pytest.raises(HandshakeError, match="memory type 'FILE'"):
        t.add_peer(msgspec.msgpack.encode(NixlBlob("FILE", 0, b"x")), [])
    fake_nixl.registry.reset()
