"""Fault injection on the P/D core (fake NIXL agent, real side channels, real KV tensors) and the
CPU offload tier. Every test has a deadline (a hang fails it), checks that every block is freed on
both sides, and that the worker still serves the next request byte for byte. Faults already held
by test_pd_faults.py are not repeated here."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from kvconnect.config import CpuOffloadConfig
from kvconnect.handshake import SideChannelServer
from kvconnect.metadata import encode
from kvconnect.telemetry import merge_stats
from tests.unit.offload_harness import OffloadEngine
from tests.unit.pd_harness import (
    Engine,
    Req,
    assert_transferred,
    decode_start,
    prefill,
    run_until,
)

pytestmark = pytest.mark.unit
FAST = {"handshake_timeout_s": 0.5, "transfer_timeout_s": 0.5}




def _idle(*engines: Engine) -> None:
    """Nothing held anywhere: no lease, no load, no pending scheduler work."""
    for e in engines:
        assert not e.sched.has_pending_work(), f"{e.name}: scheduler still holds {e.sched.get_stats()}"
        for w in e.workers:
            assert not w._loop.holds_work(), f"{e.name}: worker still holds work"
            assert not w._loop.leases.served


def _serves_next(P: Engine, D: Engine, tag: str = "next") -> None:
    """A following request moves its KV intact."""
    P.fill(hash(tag) % 1000)
    p_ids, d_ids = [[20, 21, 22]], [[17, 18, 19]]
    _, params = prefill(P, f"p-{tag}", 40, p_ids)
    decode_start(D, f"d-{tag}", 40, params, d_ids)
    assert run_until([P, D], lambda: f"d-{tag}" in D.recving and f"p-{tag}" in P.sending)
    assert f"d-{tag}" not in D.failed
    assert_transferred(P, D, p_ids, d_ids, 0, 40)


def _abort(D: Engine, rid: str, params) -> tuple[bool, object]:
    req = Req(rid, list(range(40)), params, finish_reason="abort")
    return D.sched.request_finished(req.view(), [[4, 5, 6]])


# -- the engine aborts a consumer request mid-transfer -----------------------------------------------
def test_abort_while_the_read_is_in_flight_keeps_the_blocks_until_it_ended(engines):
    P = engines("prefill")
    D = engines("decode")
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    D.agent(0).knobs.peer_stopped = True  # the READ is posted and stays in flight
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: any(ld.handles for ld in D.workers[0]._loop.loads.active.values()), 3.0)
    delay, out = _abort(D, "d", params)
    assert delay is True and out is None  # the READ may still write into the blocks
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        D.step()
        assert "d" not in D.sending, "blocks freed while the READ was in flight"
    D.agent(0).knobs.peer_stopped = False
    assert run_until([P, D], lambda: "d" in D.sending and "p" in P.sending, 3.0)
    assert "d" not in D.recving  # the engine never hears of a load for a finished request
    assert D.stats.get("loads_aborted") == 1  # the read completed, for a request already gone
    _idle(P, D)
    _serves_next(P, D)


def test_abort_of_a_load_that_then_times_out_frees_after_the_deadline(engines):
    P = engines("prefill", options={"lease_timeout_s": 1.0})
    D = engines("decode", options=FAST)
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    D.agent(0).knobs.peer_stopped = True
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    D.step()
    t0 = time.monotonic()
    assert _abort(D, "d", params)[0] is True
    assert run_until([P, D], lambda: "d" in D.sending, 3.0)
    assert 0.2 < time.monotonic() - t0 < 2.0
    assert not D.failed and "d" not in D.recving
    assert run_until([P, D], lambda: "p" in P.sending, 3.0)
    D.agent(0).knobs.peer_stopped = False
    _idle(P, D)
    _serves_next(P, D)


def test_abort_after_the_load_ended_but_before_it_was_reported_frees_at_once(engines):
    P = engines("prefill")
    D = engines("decode")
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    meta = D.sched.build_step_metadata(__import__("kvconnect.api", fromlist=["StepView"]).StepView())
    D.workers[0].bind_step_metadata(meta)
    loop = D.workers[0]._loop
    end = time.monotonic() + 3
    while "d" not in loop._outcomes.ended_loads() and time.monotonic() < end:  # ended, not drained
        time.sleep(0.002)
    assert _abort(D, "d", params)[0] is True
    assert run_until([P, D], lambda: "d" in D.sending and "p" in P.sending, 3.0)
    assert "d" not in D.recving
    assert D.stats.get("loads_aborted") == 1
    _idle(P, D)


def test_abort_before_the_load_reached_the_workers_frees_at_once_and_releases_the_producer(engines):
    P = engines("prefill")
    D = engines("decode")
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    decode_start(D, "d", 40, params, [[4, 5, 6]])  # the load is still in the scheduler
    assert _abort(D, "d", params)[0] is False
    assert run_until([P, D], lambda: "p" in P.sending, 3.0)
    assert not P.stats.get("leases_expired")
    assert D.stats.get("loads_released") == 1 and not D.stats.get("loads_aborted")
    _idle(P, D)


def test_abort_on_every_tp_rank_is_counted_once_all_ranks_ended(engines):
    P = engines("prefill", tp=2)
    D = engines("decode", tp=2)
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    D.agent(1).knobs.peer_stopped = True  # rank 1's read stays in flight, rank 0's completes
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: any(ld.handles for ld in D.workers[1]._loop.loads.active.values()), 3.0)
    assert _abort(D, "d", params)[0] is True
    for _ in range(50):
        D.step()
        time.sleep(0.002)
    assert "d" not in D.sending
    D.agent(1).knobs.peer_stopped = False
    assert run_until([P, D], lambda: "d" in D.sending and "p" in P.sending, 3.0)
    _idle(P, D)


# -- handshake faults ------------------------------------------------------------------------------
def _bogus_params(port: int) -> dict:
    return {"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [1, 2, 3],
            "remote_host": "127.0.0.1", "remote_port": port, "remote_request_id": "p", "tp_size": 1}


@pytest.mark.parametrize("reply", ["truncated", "empty", "wrong-type"])
def test_truncated_or_wrong_handshake_reply_fails_the_load_and_the_worker_serves_on(engines, reply):
    P = engines("prefill")
    D = engines("decode", options=FAST)
    good = P.workers[0]._md_bytes
    body = {"truncated": good[: len(good) // 2], "empty": b"", "wrong-type": encode({"engine_id": 3})}[reply]
    with SideChannelServer("127.0.0.1", 0, {"metadata": lambda b: body}) as bogus:
        t0 = time.monotonic()
        decode_start(D, "d", 40, _bogus_params(bogus.port), [[4, 5, 6]])
        assert run_until([D], lambda: "d" in D.recving, 3.0)
        assert time.monotonic() - t0 < 1.5
    assert "d" in D.failed and {4, 5, 6} <= D.invalid
    _idle(D)
    _serves_next(P, D)


def test_handshake_listener_down_then_back_the_next_request_handshakes_afresh(engines):
    P = engines("prefill", options={"lease_timeout_s": 0.5})
    D = engines("decode", options=FAST)
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    P.workers[0]._server.close()  # the producer's listener is down
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending, 5.0)
    assert "d" in D.failed
    w = P.workers[0]
    w._server = SideChannelServer(w._cfg.side_channel_host, w.port, {"metadata": w._serve_metadata,
                                  "write": w._serve_write, "checksums": w._serve_checksums})
    _idle(P, D)
    _serves_next(P, D)


def test_compatibility_mismatch_fails_then_a_compatible_peer_is_served(engines, caplog):
    P = engines("prefill", options={"lease_timeout_s": 0.3})
    D = engines("decode", options=FAST)
    local = D.workers[0]._loop._peers._local
    real, local.compat_hash = local.compat_hash, "f" * 32
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    with caplog.at_level(logging.WARNING):
        decode_start(D, "d", 40, params, [[4, 5, 6]])
        assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending, 5.0)
    assert "d" in D.failed and "compatibility hash" in caplog.text
    local.compat_hash = real
    _idle(P, D)
    _serves_next(P, D)


# -- transfer faults -----------------------------------------------------------------------------
def test_failed_status_among_many_concurrent_requests_fails_only_its_request(engines):
    P = engines("prefill", tp=2, kind="hnd")
    D = engines("decode", tp=1, kind="hnd")
    P.fill(3)
    rank1 = P.workers[1]._transport.agent_name
    posted = []

    def fail_third_to_rank1(h):
        if h.remote == rank1:
            posted.append(h)
            return len(posted) == 2
        return False

    D.agent(0).knobs.fail_transfers = fail_third_to_rank1
    ids = {
        "a": ([[1, 2, 3]], [[4, 5, 6]]),
        "b": ([[7, 8, 9]], [[10, 11, 12]]),
        "c": ([[13, 14, 15]], [[1, 2, 3]]),
    }
    for rid, (p_ids, d_ids) in ids.items():
        _, params = prefill(P, f"p{rid}", 40, p_ids)
        decode_start(D, rid, 40, params, d_ids)
        assert run_until([P, D], lambda rid=rid: rid in D.recving and f"p{rid}" in P.sending, 5.0)
    assert D.failed == {"b"}
    for rid in ("a", "c"):
        assert_transferred(P, D, *ids[rid], 0, 40)
    assert not P.stats.get("leases_expired")
    D.agent(0).knobs.fail_transfers = 0
    _idle(P, D)
    _serves_next(P, D)


def test_lost_notifications_both_ways_never_hang(engines):
    P = engines("prefill", mode="push", options={"lease_timeout_s": 0.6})
    D = engines("decode", mode="push", options=FAST)
    P.agent(0).knobs.lose_notifs = 1  # the WRITTEN notice vanishes
    P.fill(2)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending, 5.0)
    assert "d" in D.failed
    _idle(P, D)
    _serves_next(P, D)


def test_lease_expiring_while_the_consumer_still_reads_never_serves_reused_blocks(engines):
    P = engines("prefill", options={"lease_timeout_s": 0.3, "verify_checksums": True})
    D = engines("decode", options={"transfer_timeout_s": 3.0, "verify_checksums": True})
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    D.agent(0).knobs.peer_stopped = True  # the read hangs past the producer's lease
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: "p" in P.sending, 3.0)
    assert P.stats.get("leases_expired") == 1
    for t, _ in P.caches[0].values():  # the engine reuses the freed blocks for another request
        t.add_(1.0)
    D.agent(0).knobs.peer_stopped = False
    assert run_until([P, D], lambda: "d" in D.recving, 5.0)
    assert "d" in D.failed and {4, 5, 6} <= D.invalid
    assert D.stats.get("checksum_failures") == 1
    _idle(P, D)
    _serves_next(P, D)


def test_dead_producer_frees_consumer_blocks_and_a_new_producer_is_served(engines):
    P = engines("prefill")
    D = engines("decode", options=FAST)
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    P.agent(0).kill()
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([D], lambda: "d" in D.recving, 3.0)
    assert "d" in D.failed
    _idle(D)
    P2 = engines("prefill2")
    _serves_next(P2, D)


# -- CPU offload: the host tier ---------------------------------------------------------------------
@pytest.fixture
def offload():
    made = []

    def make(**kw) -> OffloadEngine:
        probe = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=1 << 30))
        per_block = probe.workers[0].kv_bytes_per_block
        probe.shutdown()
        e = OffloadEngine(CpuOffloadConfig(cpu_bytes_to_use=64 * per_block, **kw))
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()


def _pins_zero(e: OffloadEngine) -> bool:
    return all(e.sched.index.pins(s) == 0 for s in range(e.sched.index.num_slots))


def test_host_tier_corruption_fails_the_load_and_recompute_gives_correct_kv(offload, caplog):
    e = offload(verify_checksums=True)
    e.run("a", list(range(1, 21)))
    e.run("x", list(range(500, 517)))  # another prompt in the tier, left intact
    w = e.workers[0]
    slot = next(s for s, k in enumerate(w._slot_keys) if k is not None)
    w.layers[1].pool[slot].view(torch.uint8).view(-1)[3] ^= 0x08  # a bit flips in host memory
    with caplog.at_level(logging.WARNING):
        e.add("b", list(range(1, 22)))
        e.add("y", list(range(500, 517)))
        e.drain()
    assert e.requests["b"].load_failed and not e.requests["y"].load_failed
    assert "checksum" in caplog.text and "request b" in caplog.text
    assert e.blocks_match_truth("b", 5) and e.blocks_match_truth("y", 4)  # recomputed / loaded
    stats = {}
    for r in e.results:
        merge_stats(stats, r.stats or {})
    assert stats.get("checksum_failures") == 1
    e.finish("b")
    e.finish("y")
    e.drain()
    assert _pins_zero(e) and all(r.freed for r in e.requests.values())


def test_offload_slot_overwritten_while_its_load_is_pending_fails_cleanly(offload):
    e = offload()
    e.run("a", list(range(1, 17)))
    w = e.workers[0]
    e.add("b", list(range(1, 17)))
    held = [s for s, k in enumerate(w._slot_keys) if k is not None]
    for s in held:  # the slot was reused before the queued load ran
        w._slot_keys[s] = b"someone else"
    e.drain()
    assert e.requests["b"].load_failed and e.blocks_match_truth("b", 4)
    e.finish("b")
    e.drain()
    assert _pins_zero(e)
