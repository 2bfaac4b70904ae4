"""The P/D scheduler half: vLLM's kv_transfer_params protocol, producer leases, consumer loads,
and malformed params treated as a miss."""

from __future__ import annotations

import logging

import pytest

from kvconnect.api import EngineInfo, RequestView, StepView, TransferResults
from kvconnect.config import NixlConfig
from kvconnect.pd import wire as W
from kvconnect.pd.scheduler import PDScheduler

ENGINE = EngineInfo(engine_id="eng-p", tp_size=2, block_sizes=(16,))


def sched(**cfg) -> PDScheduler:
    return PDScheduler(NixlConfig(side_channel_port=7000, **cfg), ENGINE)


def req(rid="r1", n=40, params=None, finish=None) -> RequestView:
    return RequestView(rid, list(range(n)), transfer_params=params, finish_reason=finish)


def good_params(**over):
    p = {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "eng-p",
        "remote_block_ids": [4, 5, 6], "remote_host": "10.0.0.1", "remote_port": 7000,
        "remote_request_id": "p-1", "tp_size": 2,
    }
    p.update(over)
    return p


# -- producer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reason", ["length", "stop"])
def test_producer_keeps_blocks_and_returns_vllm_compatible_params(reason):
    s = sched(advertise_host="10.1.2.3")
    r = req(params={"do_remote_decode": True}, finish=reason)
    assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    delay, params = s.request_finished(r, ([3, 4, 5],))
    assert delay is True
    assert params == {
        "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "eng-p",
        "remote_block_ids": [3, 4, 5], "remote_host": "10.1.2.3", "remote_port": 7000,
        "remote_request_id": "r1", "tp_size": 2, "remote_block_size": 16, "kvconnect_mode": "pull",
    }
    meta = s.build_step_metadata(StepView())
    (lease,) = meta.leases
    assert lease.request_id == "r1" and [list(g) for g in lease.block_ids] == [[3, 4, 5]]
    assert s.build_step_metadata(StepView()).is_empty()


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_aborted_producer_request_frees_at_once_without_params(reason):
    s = sched()
    assert s.request_finished(req(params={"do_remote_decode": True}, finish=reason), ([3],)) == (False, None)
    assert s.build_step_metadata(StepView()).is_empty()
    assert not s.has_pending_work()


def test_request_without_transfer_params_is_left_alone():
    s = sched()
    assert s.get_num_new_matched_tokens(req(), 0) == (0, False)
    assert s.request_finished(req(finish="length"), ([1],)) == (False, None)


def test_hybrid_producer_sends_block_ids_per_group():
    _, params = sched().request_finished(req(params={"do_remote_decode": True}, finish="length"), ([1, 2], [0, 3]))
    assert params["remote_block_ids"] == [[1, 2], [0, 3]]


def test_lease_is_pending_work_until_every_worker_reported_it_sent():
    s = sched()
    s.request_finished(req(params={"do_remote_decode": True}, finish="length"), ([1],))
    s.build_step_metadata(StepView())
    assert s.has_pending_work()
    s.update_worker_output(TransferResults(finished_sending={"r1"}))
    assert not s.has_pending_work()


def test_push_mode_is_advertised():
    _, params = sched(mode="push").request_finished(req(params={"do_remote_decode": True}, finish="length"), ([1],))
    assert params["kvconnect_mode"] == "push"


# -- consumer ---------------------------------------------------------------------------------------
def test_consumer_offers_every_uncomputed_prompt_token_asynchronously():
    s = sched()
    r = req(n=40, params=good_params())
    assert s.get_num_new_matched_tokens(r, 0) == (40, True)
    assert s.get_num_new_matched_tokens(r, 16) == (24, True)  # asked again: same answer shape


def test_consumer_load_is_emitted_once_with_local_and_remote_blocks():
    s = sched()
    r = req(n=40, params=good_params())
    s.get_num_new_matched_tokens(r, 16)
    s.update_state_after_alloc(r, ([8, 9, 10],), 24)
    meta = s.build_step_metadata(StepView())
    (load,) = meta.loads
    assert load.request_id == "r1" and load.remote_request_id == "p-1"
    assert [list(g) for g in load.local_block_ids] == [[8, 9, 10]]
    assert [list(g) for g in load.remote_block_ids] == [[4, 5, 6]]
    assert (load.token_start, load.token_end) == (16, 40)
    assert load.remote == W.Remote(engine_id="eng-p", host="10.0.0.1", port=7000, tp_size=2)
    assert s.build_step_metadata(StepView()).is_empty()
    # one transfer per request: a later query is a miss
    assert s.get_num_new_matched_tokens(r, 40) == (0, False)
    s.update_state_after_alloc(r, ([8, 9, 10],), 0)
    assert s.build_step_metadata(StepView()).is_empty()


def test_consumer_load_is_pending_work_until_received():
    s = sched()
    r = req(params=good_params())
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, ([8, 9, 10],), 40)
    s.build_step_metadata(StepView())
    assert s.has_pending_work()
    s.update_worker_output(TransferResults(finished_recving={"r1"}, failed_recving={"r1"}))
    assert not s.has_pending_work()


def test_failed_load_finished_by_the_engine_in_the_same_update_sends_no_abort():
    """vLLM with kv_load_failure_policy=fail: the failed receive makes it finish the request
    (request_finished) before it hands us the same output (update_worker_output), then frees the
    blocks through that receive. An abort reaching the workers afterwards would make them report
    finished_sending for a request vLLM already deleted (its assert stops the engine)."""
    s = sched()
    r = req(params=good_params())
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, ([8, 9, 10],), 40)
    s.build_step_metadata(StepView())  # the load reached the workers
    delay, _ = s.request_finished(req(params=good_params(), finish="error"), ([8, 9, 10],))
    assert delay is True  # the READ might still be in flight, as far as the scheduler knows
    s.update_worker_output(TransferResults(finished_recving={"r1"}, failed_recving={"r1"}))
    assert s.build_step_metadata(StepView()).aborts == ()
    assert not s.has_pending_work()


def test_abort_while_loading_reaches_the_workers_and_waits_for_them():
    s = sched()
    r = req(params=good_params())
    s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, ([8, 9, 10],), 40)
    s.build_step_metadata(StepView())
    assert s.request_finished(req(params=good_params(), finish="abort"), ([8, 9, 10],))[0] is True
    assert s.build_step_metadata(StepView()).aborts == ("r1",)
    assert s.has_pending_work()
    s.update_worker_output(TransferResults(finished_sending={"r1"}))
    assert not s.has_pending_work()


def test_fully_cached_consumer_request_releases_the_producer_blocks():
    s = sched()
    r = req(n=40, params=good_params())
    assert s.get_num_new_matched_tokens(r, 40) == (0, False)
    s.update_state_after_alloc(r, ([8, 9, 10],), 0)
    meta = s.build_step_metadata(StepView())
    assert not meta.loads
    assert meta.releases == (W.ReleaseSpec(request_id="r1", remote_request_id="p-1",
                                           remote=W.Remote(engine_id="eng-p", host="10.0.0.1", port=7000, tp_size=2)),)


def test_consumer_aborted_before_allocation_releases_the_producer_blocks():
    s = sched()
    r = req(params=good_params(), finish="abort")
    s.get_num_new_matched_tokens(r, 0)
    assert s.request_finished(r, ([],)) == (False, None)
    (rel,) = s.build_step_metadata(StepView()).releases
    assert rel.remote_request_id == "p-1"


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"remote_host": None}, "remote_host"),
        ({"remote_port": "seven"}, "remote_port"),
        ({"remote_port": 70000}, "remote_port"),
        ({"remote_block_ids": "1,2,3"}, "remote_block_ids must be a list"),
        ({"remote_block_ids": [[1, 2, 3], 4]}, "mixes"),
        ({"remote_block_ids": [[1, 2, 3], [4, 5, 6]]}, "group"),
        ({"remote_block_ids": [1]}, "cover"),
        ({"remote_request_id": None}, "remote_request_id"),
        ({"tp_size": 0}, "tp_size"),
        ({"kvconnect_mode": "teleport"}, "kvconnect_mode"),
    ],
)
def test_malformed_params_are_a_logged_miss_not_a_crash(caplog, bad, field):
    s = sched()
    params = good_params(**bad)
    params = {k: v for k, v in params.items() if v is not None}
    r = req(n=40, params=params)
    with caplog.at_level(logging.WARNING, logger="kvconnect.pd.scheduler"):
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
        s.update_state_after_alloc(r, ([1, 2, 3],), 0)
    assert s.build_step_metadata(StepView()).is_empty()
    assert field in caplog.text and "r1" in caplog.text


def test_params_are_parsed_once_per_request(monkeypatch):
    import kvconnect.pd.scheduler as mod

    calls = []
    real = mod.parse_transfer_params
    monkeypatch.setattr(mod, "parse_transfer_params", lambda p: calls.append(1) or real(p))
    s = sched()
    r = req(params=good_params())
    for _ in range(5):
        s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, ([1, 2, 3],), 40)
    assert len(calls) == 1
