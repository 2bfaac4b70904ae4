"""The P/D scheduler half: vLLM's kv_transfer_params protocol, producer leases, consumer loads
(the router's params handed on unread), and the worker-side check of those params."""

from __future__ import annotations

import pytest

from kvconnect.api import EngineInfo, RequestView, StepView, TransferResults
from kvconnect.config import NixlConfig
from kvconnect.errors import WireError
from kvconnect.pd import wire as W
from kvconnect.pd.params import resolve_load, resolve_release
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
    _, params = sched().request_finished(
        req(params={"do_remote_decode": True}, finish="length"), ([1, 2], [0, 3])
    )
    assert params["remote_block_ids"] == [[1, 2], [0, 3]]


def test_lease_is_pending_work_until_every_worker_reported_it_sent():
    s = sched()
    s.request_finished(req(params={"do_remote_decode": True}, finish="length"), ([1],))
    s.build_step_metadata(StepView())
    assert s.has_pending_work()
    s.update_worker_output(TransferResults(finished_sending={"r1"}))
    assert not s.has_pending_work()


def test_push_mode_is_advertised():
    _, params = sched(mode="push").request_finished(
        req(params={"do_remote_decode": True}, finish="length"), ([1],)
    )
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
    (req_,) = meta.loads
    assert req_.request_id == "r1" and req_.params == good_params()
    assert [list(g) for g in req_.local_block_ids] == [[8, 9, 10]]
    assert (req_.token_start, req_.token_end) == (16, 40)
    load = resolve_load(req_, ENGINE.block_sizes, "pull")  # what the worker makes of it
    assert load.request_id == "r1" and load.remote_request_id == "p-1"
    assert [list(g) for g in load.local_block_ids] == [[8, 9, 10]]
    assert [list(g) for g in load.remote_block_ids] == [[4, 5, 6]]
    assert (load.token_start, load.token_end, load.mode) == (16, 40, "pull")
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
    assert meta.releases == (W.ReleaseRequest(request_id="r1", params=good_params()),)
    assert resolve_release(meta.releases[0]) == W.ReleaseSpec(
        request_id="r1", remote_request_id="p-1",
        remote=W.Remote(engine_id="eng-p", host="10.0.0.1", port=7000, tp_size=2))


def test_consumer_aborted_before_allocation_releases_the_producer_blocks():
    s = sched()
    r = req(params=good_params(), finish="abort")
    s.get_num_new_matched_tokens(r, 0)
    assert s.request_finished(r, ([],)) == (False, None)
    (rel,) = s.build_step_metadata(StepView()).releases
    assert resolve_release(rel).remote_request_id == "p-1"


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
        ({"remote_block_size": 0}, "remote_block_size"),
        ({"remote_request_id": None}, "remote_request_id"),
        ({"tp_size": 0}, "tp_size"),
        ({"kvconnect_mode": "teleport"}, "kvconnect_mode"),
    ],
)
def test_malformed_params_reach_the_worker_and_fail_its_check_naming_the_field(bad, field):
    s = sched()
    params = good_params(**bad)
    params = {k: v for k, v in params.items() if v is not None}
    r = req(n=40, params=params)
    assert s.get_num_new_matched_tokens(r, 0) == (40, True)  # the scheduler does not look
    s.update_state_after_alloc(r, ([1, 2, 3],), 40)
    (load,) = s.build_step_metadata(StepView()).loads
    with pytest.raises(WireError, match=field):
        resolve_load(load, ENGINE.block_sizes, "pull")


class _ReadLog(dict):
    """Router params that record which keys were read."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read: list[str] = []

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def test_the_scheduler_reads_only_do_remote_prefill_of_the_router_params():
    """The engine's scheduler thread decides on one key; every other field is the worker's to read
    (its check costs more there than the rest of the request's connector work)."""
    s = sched()
    params = _ReadLog(good_params())
    r = req(params=params)
    for _ in range(3):  # the engine asks again while the request waits for budget
        s.get_num_new_matched_tokens(r, 0)
    s.update_state_after_alloc(r, ([1, 2, 3],), 40)
    s.update_state_after_alloc(r, ([1, 2, 3],), 0)  # vLLM's second notice, once the load arrived
    (load,) = s.build_step_metadata(StepView()).loads
    s.update_worker_output(TransferResults(finished_recving={"r1"}))
    s.request_finished(
        RequestView("r1", list(range(40)), transfer_params=params, finish_reason="length"), ([1, 2, 3],)
    )
    assert set(params.read) == {"do_remote_prefill"}
    assert load.params is params  # handed on, not copied
