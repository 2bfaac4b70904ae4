"""P/D failure handling on the fake NIXL agent: every failure ends in a failed load with its blocks
reported invalid (never a hang, never unverified KV), and producer blocks are always freed."""

from __future__ import annotations

import logging
import time

import pytest

from kvconnect.api import StepView
from kvconnect.handshake import SideChannelServer
from tests.unit.pd_harness import (
    assert_transferred,
    decode_start,
    prefill,
    run_until,
)

FAST = {"handshake_timeout_s": 0.5, "transfer_timeout_s": 0.5}
P_IDS, D_IDS = [[1, 2, 3]], [[4, 5, 6]]


def _start(P, D, prompt_len=40, p_ids=P_IDS, d_ids=D_IDS, tag=""):
    """Request ``p<tag>`` on the producer, then ``d<tag>`` on the consumer with its params."""
    P.fill(1)
    _, params = prefill(P, f"p{tag}", prompt_len, p_ids)
    decode_start(D, f"d{tag}", prompt_len, params, d_ids)
    return params


def _assert_served_after_restart(P, D, tag, why):
    """A request after a peer restarted: loaded, producer blocks freed, bytes equal."""
    _start(P, D, p_ids=[[7, 8, 9]], d_ids=[[10, 11, 12]], tag=tag)
    assert run_until([P, D], lambda: f"d{tag}" in D.recving and f"p{tag}" in P.sending)
    assert f"d{tag}" not in D.failed, why
    assert_transferred(P, D, [[7, 8, 9]], [[10, 11, 12]], 0, 40)


def _assert_failed(D, d_ids=D_IDS, timeout=5.0, others=()):
    t0 = time.monotonic()
    assert run_until([D, *others], lambda: "d" in D.recving, timeout), "load neither finished nor failed"
    assert "d" in D.failed
    assert set(d_ids[0]) <= D.invalid
    return time.monotonic() - t0


def test_incompatible_model_fails_the_load_with_a_clear_error(engines, caplog):
    P = engines("prefill", tp=1, options={"lease_timeout_s": 0.3})
    D = engines("decode", tp=1, options=FAST)
    D.workers[0]._loop._peers._local.compat_hash = "0" * 32  # a different model on the consumer
    with caplog.at_level(logging.WARNING):
        _start(P, D)
        _assert_failed(D)
    assert "compatibility hash" in caplog.text
    assert run_until([P], lambda: "p" in P.sending), "the lease must still free the producer blocks"


def test_garbage_handshake_reply_fails_the_load(engines, caplog):
    D = engines("decode", tp=1, options=FAST)
    with SideChannelServer("127.0.0.1", 0, {"metadata": lambda b: b"\xff\x00garbage"}) as bogus:
        params = {
            "do_remote_prefill": True,
            "remote_engine_id": "x",
            "remote_block_ids": [1, 2, 3],
            "remote_host": "127.0.0.1",
            "remote_port": bogus.port,
            "remote_request_id": "p",
            "tp_size": 1,
        }
        with caplog.at_level(logging.WARNING):
            decode_start(D, "d", 40, params, D_IDS)
            _assert_failed(D)
    assert "handshake metadata" in caplog.text


def test_unreachable_producer_fails_within_the_handshake_deadline(engines):
    D = engines("decode", tp=1, options=FAST)
    params = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [1, 2, 3],
              "remote_host": "127.0.0.1", "remote_port": D.port + 50, "remote_request_id": "p", "tp_size": 1}
    t0 = time.monotonic()
    decode_start(D, "d", 40, params, D_IDS)
    D.step()
    assert time.monotonic() - t0 < 0.2, "the engine thread must not wait for the handshake"
    assert _assert_failed(D) < 3.0


def test_one_failed_status_among_many_fails_the_load_and_frees_every_producer_rank(engines):
    P = engines("prefill", tp=2, kind="hnd")
    D = engines("decode", tp=1, kind="hnd", options=FAST)
    rank1 = P.workers[1]._transport.agent_name
    D.agent(0).knobs.fail_transfers = lambda h: h.remote == rank1
    _start(P, D)
    _assert_failed(D)
    assert D.stats.get("loads_failed") == 1
    # rank 0 was read (its notice rode on the read); rank 1 was told after the failure
    assert run_until([P], lambda: "p" in P.sending, 2.0), (
        "producer blocks must be freed before the lease ends"
    )


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_load_fails_when_the_first_status_failed_and_the_last_succeeded(engines, mode):
    """The all-statuses rule on the NIXL path, in the order that caught other integrations (only the
    newest status was checked): a load's first transfer ends ERR, its last ends DONE -> failed."""
    P = engines("prefill", tp=2, kind="hnd", mode=mode)
    D = engines("decode", tp=1, kind="hnd", mode=mode, options=FAST)
    initiators = [D.agent(0)] if mode == "pull" else [P.agent(0), P.agent(1)]
    posted = []

    def first_fails(handle) -> bool:
        posted.append(handle)
        return len(posted) == 1

    for agent in initiators:
        agent.knobs.fail_transfers = first_fails
        agent.knobs.cycles_before_done = 200  # polls: the sibling is still in flight when the first fails
    loop = D.workers[0]._loop
    states_at_report = []
    report = loop.loads._report_failed

    def spy(*args, **kw):
        states_at_report.append([h.state for h in posted])
        return report(*args, **kw)

    loop.loads._report_failed = spy
    _start(P, D)
    _assert_failed(D, others=[P])
    assert len(posted) >= 2, f"the load should need several transfers, posted {posted}"
    # Reported only once the sibling settled: the engine reuses invalid blocks, and a late read or
    # write would land in their next owner.
    assert states_at_report == [["ERR"] + ["DONE"] * (len(posted) - 1)], states_at_report
    assert "d" in D.failed and set(D_IDS[0]) <= D.invalid
    assert run_until([P, D], lambda: "p" in P.sending, 2.0), (
        "producer blocks must be freed before the lease ends"
    )


def test_dead_producer_fails_the_load_fast(engines):
    P = engines("prefill", tp=1)
    D = engines("decode", tp=1, options={"transfer_timeout_s": 5.0})
    _start(P, D)
    P.agent(0).kill()
    assert _assert_failed(D) < 2.0


def test_producer_restarted_under_the_same_engine_id_is_reached_again(engines):
    # A deployment that pins engine_id restarts its prefill instance: the consumer still holds the
    # old incarnation, fails one load against it, then must handshake afresh and load again. NIXL
    # refuses a peer's metadata under a name it still holds, so each start names its agent anew.
    P1 = engines("prefill", options={"lease_timeout_s": 0.5})
    D = engines("decode", options={"transfer_timeout_s": 3.0})
    _start(P1, D, tag="1")
    assert run_until([P1, D], lambda: "d1" in D.recving) and "d1" not in D.failed
    old_agent = P1.workers[0]._transport.agent_name
    P1.agent(0).kill()
    P1.shutdown()
    P2 = engines("prefill", options={"side_channel_port": P1.cfg.side_channel_port})
    assert P2.workers[0]._transport.agent_name != old_agent
    _start(P2, D, tag="2")
    assert run_until([P2, D], lambda: "d2" in D.recving)  # against the old incarnation: fails once
    _assert_served_after_restart(P2, D, "3", "the consumer never reached the restarted producer")


def test_consumer_restarted_under_the_same_engine_id_is_written_to_again(engines):
    # Push mode, the other way round: the producer holds the consumer's old incarnation.
    P = engines("prefill", mode="push", options={"lease_timeout_s": 1.0})
    D1 = engines("decode", mode="push")
    _start(P, D1, tag="1")
    assert run_until([P, D1], lambda: "d1" in D1.recving) and "d1" not in D1.failed
    D1.agent(0).kill()
    D1.shutdown()
    D2 = engines("decode", mode="push", options={"side_channel_port": D1.cfg.side_channel_port,
                                                  "transfer_timeout_s": 1.0})
    _start(P, D2, tag="2")
    assert run_until([P, D2], lambda: "d2" in D2.recving)  # written to the old incarnation: fails once
    _assert_served_after_restart(P, D2, "3", "the producer never reached the restarted consumer")


def test_producer_that_hung_then_was_replaced_is_reached_after_one_deadline(engines):
    # The old process stops answering (its READs stay in flight) and a new one takes over its
    # engine_id and port: the load that hit the deadline drops the old peer, so the next one
    # handshakes with the new process instead of waiting out a deadline each time.
    P1 = engines("prefill", options={"lease_timeout_s": 0.5})
    D = engines("decode", options=FAST)
    _start(P1, D, tag="0")
    assert run_until([P1, D], lambda: "d0" in D.recving) and "d0" not in D.failed
    D.agent(0).knobs.peer_stopped = {P1.workers[0]._transport.agent_name}
    P1.shutdown()
    P2 = engines("prefill", options={"side_channel_port": P1.cfg.side_channel_port})
    _start(P2, D, tag="1")
    assert run_until([P2, D], lambda: "d1" in D.recving) and "d1" in D.failed  # the old one: deadline
    _assert_served_after_restart(P2, D, "2", "the load after the deadline went to the hung process again")


def test_stopped_producer_fails_at_the_transfer_deadline(engines):
    P = engines("prefill", tp=1)
    D = engines("decode", tp=1, options=FAST)
    D.agent(0).knobs.peer_stopped = True
    _start(P, D)
    elapsed = _assert_failed(D)
    assert 0.4 < elapsed < 3.0


def test_lost_write_notification_times_out_the_push_load(engines):
    P = engines("prefill", tp=1, mode="push")
    D = engines("decode", tp=1, mode="push", options=FAST)
    P.agent(0).knobs.lose_notifs = True
    _start(P, D)
    _assert_failed(D, others=[P])
    assert run_until([P], lambda: "p" in P.sending), "the producer frees once its write completed"


def test_failed_push_write_fails_the_load_before_the_deadline(engines):
    P = engines("prefill", tp=1, mode="push")
    D = engines("decode", tp=1, mode="push", options={"transfer_timeout_s": 10.0})
    P.agent(0).knobs.fail_transfers = True
    _start(P, D)
    assert _assert_failed(D, others=[P]) < 3.0
    assert run_until([P], lambda: "p" in P.sending)


def test_lost_done_notice_is_covered_by_the_lease(engines):
    P = engines("prefill", tp=1, options={"lease_timeout_s": 0.5})
    D = engines("decode", tp=1)
    D.agent(0).knobs.lose_notifs = True
    _start(P, D)
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert "d" not in D.failed
    assert P.stats.get("leases_expired") == 1


def test_lease_expiry_frees_blocks_nobody_reads(engines):
    P = engines("prefill", tp=2, options={"lease_timeout_s": 0.3})
    t0 = time.monotonic()
    P.fill(0)
    delay, _ = prefill(P, "p", 40, P_IDS)
    assert delay
    assert run_until([P], lambda: "p" in P.sending, 3.0)
    assert time.monotonic() - t0 >= 0.3
    assert P.stats.get("leases_expired") == 2  # one per TP rank
    assert not P.sched.has_pending_work()


def test_consumer_that_will_not_read_releases_the_producer_at_once(engines):
    P = engines("prefill", tp=2)
    D = engines("decode", tp=1)
    P.fill(0)
    _, params = prefill(P, "p", 40, P_IDS)
    decode_start(D, "d", 40, params, D_IDS, computed=40)  # fully cached on the consumer
    assert run_until([P, D], lambda: "p" in P.sending, 2.0)
    assert not P.stats.get("leases_expired")


def test_early_done_notice_before_the_lease_is_kept(engines):
    P = engines("prefill", tp=1)
    D = engines("decode", tp=1)
    P.fill(0)
    _, params = prefill(P, "p", 40, P_IDS)
    meta = P.sched.build_step_metadata(StepView())
    decode_start(D, "d", 40, params, D_IDS)  # the consumer reads before the producer binds the lease
    assert run_until([D], lambda: "d" in D.recving)
    time.sleep(0.05)
    for w in P.workers:
        w.bind_step_metadata(meta)
    assert run_until([P], lambda: "p" in P.sending, 2.0)
    assert not P.stats.get("leases_expired")


def test_push_write_request_for_an_unknown_request_fails_fast(engines):
    P = engines("prefill", tp=1, mode="push", options={"handshake_timeout_s": 0.3})
    D = engines("decode", tp=1, mode="push", options={"transfer_timeout_s": 10.0})
    _start(P, D)  # the producer engine never steps again: its workers never learn of the lease
    assert _assert_failed(D, others=[]) < 3.0


def test_secret_mismatch_refuses_the_handshake(engines):
    P = engines("prefill", tp=1, options={"secret": "s3cret"})
    D = engines("decode", tp=1, options={**FAST, "secret": "other"})
    _start(P, D)
    _assert_failed(D)


def test_idle_worker_sleeps_between_rounds(engines):
    D = engines("decode", tp=1, options={"idle_poll_interval_s": 0.05})
    loop = D.workers[0]._loop
    before = loop.rounds
    time.sleep(0.5)
    assert loop.rounds - before <= 15


def test_busy_worker_polls_at_the_busy_interval_not_a_spin(engines):
    P = engines("prefill", tp=1, options={"poll_interval_s": 0.01})
    P.fill(0)
    prefill(P, "p", 40, P_IDS)
    P.step()
    loop = P.workers[0]._loop
    before = loop.rounds
    time.sleep(0.3)
    assert 3 <= loop.rounds - before <= 40



MALFORMED_IDS = [([1, -2, 3], "block id -2"), ([1, "x", 3], "must be a list of integers"),
                 ([1, 2.5, 3], "must be a list of integers"), ([1, [2], 3], "must be a list of integers")]


@pytest.mark.parametrize("ids,named", MALFORMED_IDS)
def test_malformed_remote_block_ids_fail_the_pull_naming_them(engines, caplog, ids, named):
    # The scheduler takes a router's id list without walking it; the worker that turns the ids into
    # descriptor indices refuses what is not a block of the producer's cache, before any read.
    P = engines("prefill", tp=2, kind="hnd", options={"lease_timeout_s": 60.0})
    D = engines("decode", tp=1, kind="hnd", options=FAST)
    P.fill(1)
    _, params = prefill(P, "p", 40, P_IDS)
    with caplog.at_level(logging.WARNING):
        decode_start(D, "d", 40, dict(params, remote_block_ids=ids), D_IDS)
        _assert_failed(D, others=[P])
    assert named in caplog.text and "remote block id" in caplog.text
    # Every producer rank is told at once (not left to its 60 s lease): the ids were bad, not the peers.
    assert run_until([P, D], lambda: "p" in P.sending, 3.0), "the producer's blocks must be freed now"


@pytest.mark.parametrize("ids,named", MALFORMED_IDS[:2])
def test_push_writes_from_the_producer_lease_whatever_remote_block_ids_say(engines, ids, named):
    # In push mode the producer writes the blocks it leased; the router's copy of their ids is unused.
    P = engines("prefill", mode="push")
    D = engines("decode", mode="push")
    P.fill(1)
    _, params = prefill(P, "p", 40, P_IDS)
    decode_start(D, "d", 40, dict(params, remote_block_ids=ids), D_IDS)
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert "d" not in D.failed
    assert_transferred(P, D, P_IDS, D_IDS, 0, 40)


@pytest.mark.parametrize("bad,named", [
    ({"remote_port": "seven"}, "remote_port"),
    ({"remote_host": None}, "remote_host"),
    ({"tp_size": 0}, "tp_size"),
    ({"remote_block_ids": [[1, 2, 3], [4, 5, 6]]}, "KV-cache group"),
    ({"remote_block_ids": [1]}, "cover"),
])
def test_malformed_router_params_fail_the_load_at_once_naming_the_field(engines, caplog, bad, named):
    # The scheduler hands the router's params on unread; the consumer worker's check fails the load
    # before any handshake, with the field named, and the worker serves the next request.
    P = engines("prefill", tp=1, options={"lease_timeout_s": 0.5})
    D = engines("decode", tp=1, options={"handshake_timeout_s": 30.0, "transfer_timeout_s": 30.0})
    P.fill(1)
    _, params = prefill(P, "p", 40, P_IDS)
    bad_params = {k: v for k, v in dict(params, **bad).items() if v is not None}
    with caplog.at_level(logging.WARNING):
        decode_start(D, "d", 40, bad_params, D_IDS)
        assert _assert_failed(D, timeout=2.0) < 2.0, "a malformed load must not wait for any deadline"
    assert named in caplog.text and "request d" in caplog.text
    assert run_until([P], lambda: "p" in P.sending), "the producer's lease still frees its blocks"
    _assert_served_after_restart(P, D, "2", "the worker must serve on after a malformed load")
