"""MoRI backend failure handling on the fake ``mori.io``: every failure ends in a failed load with
its blocks reported invalid (never a hang, never unverified KV), producer blocks are always freed,
and the known faults of earlier MoRI integrations stay fixed:

1. a request marked done when only its last status succeeded;
2. a load loop that spins while a handshake is pending;
3. a hard-coded, effectively infinite transfer timeout.
"""

from __future__ import annotations

import logging
import math
import time

import msgspec
import pytest

from kvconnect.config import MoriConfig, PDConfig
from kvconnect.metadata import HandshakeMetadata, encode
from kvconnect.testing.ports import free_port_range
from tests.fakes import fake_mori as fm
from tests.unit.pd_harness import decode_start, prefill, run_until
from tests.unit.test_mori_harness import MoriEngine, mori_engines


@pytest.fixture
def engines():
    yield from mori_engines()


P_IDS, D_IDS = [[1, 2, 3]], [[4, 5, 6]]
SC = fm.StatusCode


def _start(P: MoriEngine, D: MoriEngine, prompt_len: int = 40, rid: str = "p", drid: str = "d"):
    P.fill(1)
    _, params = prefill(P, rid, prompt_len, P_IDS)
    decode_start(D, drid, prompt_len, params, D_IDS)
    return params


def _assert_failed(D: MoriEngine, others=(), timeout: float = 5.0, rid: str = "d") -> float:
    t0 = time.monotonic()
    assert run_until([D, *others], lambda: rid in D.recving, timeout), "load neither finished nor failed"
    assert rid in D.failed
    assert set(D_IDS[0]) <= D.invalid
    return time.monotonic() - t0


# -- (1) every status must succeed -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pull", "push"])
def test_load_fails_when_the_first_status_failed_and_the_last_succeeded(engines, monkeypatch, mode):
    P = engines("prefill", mode=mode)
    D = engines("decode", mode=mode, options={"transfer_timeout_s": 10.0})
    initiator = D.agent(0) if mode == "pull" else P.agent(0)
    initiator.fake_knobs = fm.FakeMoriKnobs(fail_code=SC.ERR_RDMA_OP, fail_filter=fm.FakeMoriKnobs.nth(0))
    batches: list[list] = []
    name = "batch_read" if mode == "pull" else "batch_write"
    real = getattr(initiator, name)

    def spy(*args):
        batches.append(real(*args))
        return batches[-1]

    monkeypatch.setattr(initiator, name, spy)
    _start(P, D)
    assert _assert_failed(D, others=[P]) < 3.0
    statuses = batches[0]
    assert len(statuses) >= 2 and statuses[0].Failed() and statuses[-1].Succeeded()
    assert "d" not in D.recving - D.failed
    assert run_until([P, D], lambda: "p" in P.sending, 3.0), "producer blocks freed before the lease ends"
    assert not P.stats.get("leases_expired")


# -- (2) no spinning while a handshake is pending ---------------------------------------------------
def test_load_waiting_for_a_handshake_blocks_instead_of_spinning(engines):
    import zmq

    interval = 0.01
    D = engines("decode", options={"poll_interval_s": interval, "idle_poll_interval_s": interval,
                                   "handshake_timeout_s": 1.5})
    t = D.transport(0)
    calls = {"n": 0}
    real_notifs, real_poll = t.notifications, t.poll

    def count(fn):
        def wrapped(*a):
            calls["n"] += 1
            return fn(*a)
        return wrapped

    t.notifications, t.poll = count(real_notifs), count(real_poll)
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # accepts the handshake, never answers
    port = free_port_range(1)
    silent.bind(f"tcp://127.0.0.1:{port}")
    try:
        params = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [1, 2, 3],
                  "remote_host": "127.0.0.1", "remote_port": port, "remote_request_id": "p", "tp_size": 1}
        decode_start(D, "d", 40, params, D_IDS)
        t0 = time.monotonic()
        D.step()
        assert time.monotonic() - t0 < 0.1, "the engine thread must not wait for the handshake"
        time.sleep(0.1)
        loop = D.workers[0]._loop
        assert loop.loads.active, "the load should be waiting for its handshake"
        rounds0, calls0, cpu0, w0 = loop.rounds, calls["n"], time.process_time(), time.monotonic()
        time.sleep(0.6)
        assert "d" not in D.recving  # still waiting
        elapsed = time.monotonic() - w0
        rounds, transport_calls, cpu = loop.rounds - rounds0, calls["n"] - calls0, time.process_time() - cpu0
        budget = elapsed / interval * 1.5 + 10
        assert rounds <= budget, f"{rounds} progress rounds in {elapsed:.2f}s: the load loop spins"
        assert transport_calls <= budget, f"{transport_calls} transport polls in {elapsed:.2f}s"
        assert cpu < 0.5 * elapsed, f"{cpu:.2f}s CPU in {elapsed:.2f}s while only waiting"
        assert _assert_failed(D, timeout=3.0) < 2.0  # ... and the handshake deadline still ends it
    finally:
        silent.close(linger=0)


# -- (3) configurable, finite timeouts -----------------------------------------------------------------
def test_every_timeout_has_a_finite_default_and_comes_from_the_config(engines):
    cfg = MoriConfig()
    for key in ("handshake_timeout_s", "transfer_timeout_s", "lease_timeout_s", "poll_interval_s",
                "idle_poll_interval_s"):
        v = getattr(cfg, key)
        assert key in PDConfig.__struct_fields__ and 0 < v < 3600 and math.isfinite(v), key
    D = engines("decode", options={"transfer_timeout_s": 0.25})
    assert D.transport(0)._timeout == 0.25


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_hung_status_fails_the_load_within_transfer_timeout(engines, mode):
    """The P/D core's own deadline is handshake + transfer timeout from the load's start (5.5 s
    here); the transport ends a hung transfer at transfer_timeout_s from its start."""
    opts = {"handshake_timeout_s": 5.0, "transfer_timeout_s": 0.5, "lease_timeout_s": 10.0}
    P = engines("prefill", mode=mode, options=opts)
    D = engines("decode", mode=mode, options=opts)
    (D.agent(0) if mode == "pull" else P.agent(0)).fake_knobs = fm.FakeMoriKnobs(hang=True)
    _start(P, D)
    elapsed = _assert_failed(D, others=[P], timeout=8.0)
    assert 0.4 < elapsed < 2.0, elapsed
    assert run_until([P, D], lambda: "p" in P.sending, 3.0)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_no_unbounded_wait_is_ever_used(engines, monkeypatch, mode):
    used = []
    real_wait_for = fm.TransferStatus._wait_for

    def wait_for(self, timeout_ms=-1):
        if int(timeout_ms) != 0:
            used.append(timeout_ms)
        return real_wait_for(self, timeout_ms)

    monkeypatch.setattr(fm.TransferStatus, "_wait_for", wait_for)
    monkeypatch.setattr(fm.IOEngine, "_wait_all", lambda self, s, t=-1: used.append(("wait_all", t)))
    P = engines("prefill", mode=mode)
    D = engines("decode", mode=mode)
    fm.knobs.polls_to_complete = 5
    _start(P, D)
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert "d" not in D.failed and used == []


# -- other failures ----------------------------------------------------------------------------------
def test_dead_producer_fails_the_load_fast(engines):
    P = engines("prefill")
    D = engines("decode", options={"transfer_timeout_s": 10.0})
    P.fill(1)
    prefill(P, "warm", 40, [[7, 8, 9]])  # first contact done: the peer's session exists
    _, params = prefill(P, "p", 40, P_IDS)
    fm.kill_engine(P.agent(0))
    decode_start(D, "d", 40, params, D_IDS)
    assert _assert_failed(D) < 3.0


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_failed_transfer_fails_the_load_before_the_deadline(engines, mode):
    P = engines("prefill", mode=mode)
    D = engines("decode", mode=mode, options={"transfer_timeout_s": 10.0})
    (D.agent(0) if mode == "pull" else P.agent(0)).fake_knobs = fm.FakeMoriKnobs(fail_code=SC.ERR_RDMA_OP)
    _start(P, D)
    assert _assert_failed(D, others=[P]) < 3.0
    assert run_until([P, D], lambda: "p" in P.sending, 3.0)


def test_restarted_producer_is_reached_under_its_new_engine_key(engines):
    P1 = engines("prefill", options={"lease_timeout_s": 0.5})
    D = engines("decode")
    _start(P1, D, rid="p1", drid="d1")
    assert run_until([P1, D], lambda: "d1" in D.recving) and "d1" not in D.failed
    old_key = P1.transport(0).agent_name
    fm.kill_engine(P1.agent(0))
    P1.shutdown()
    P2 = engines("prefill", options={"side_channel_port": P1.cfg.side_channel_port})
    assert P2.transport(0).agent_name != old_key
    _start(P2, D, rid="p2", drid="d2")  # the consumer still holds the old incarnation: fails once
    assert run_until([P2, D], lambda: "d2" in D.recving)
    _start(P2, D, rid="p3", drid="d3")  # ... and handshakes afresh
    assert run_until([P2, D], lambda: "d3" in D.recving and "p3" in P2.sending)
    assert "d3" not in D.failed


def test_garbage_mori_metadata_in_the_handshake_fails_the_load(engines, caplog):
    P = engines("prefill")
    D = engines("decode", options={"handshake_timeout_s": 0.5, "transfer_timeout_s": 0.5})
    w = P.workers[0]
    md = msgspec.msgpack.decode(w._md_bytes, type=HandshakeMetadata)
    w._md_bytes = encode(msgspec.structs.replace(md, transport_metadata=b"\x93garbage"))
    with caplog.at_level(logging.WARNING):
        _start(P, D)
        _assert_failed(D)
    assert "MoRI transport metadata" in caplog.text
