"""The vLLM adapter's scheduler hot path: requests a backend never loads for skip the backend."""

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("vllm")
    from kvconnect.bench import vllm_env as B

    return B.make_env(16, 256, 512)


def _request(rid, params):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    extra = {"kv_transfer_params": params} if params is not None else None
    return Request(rid, list(range(40)), SamplingParams(max_tokens=2, extra_args=extra), None)


def _counting(conn, monkeypatch):
    calls = []
    for name in ("get_num_new_matched_tokens", "update_state_after_alloc"):
        real = getattr(conn._sched, name)
        monkeypatch.setattr(conn._sched, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    return calls


def _blocks():
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return KVCacheBlocks(([KVCacheBlock(i) for i in (4, 5, 6)],))


def test_pd_backend_is_not_asked_about_requests_it_never_loads_for(env, monkeypatch):
    from kvconnect.bench import vllm_env as B

    conn = B.build_connector(env, "KVConnect", "kv_consumer", dict(B.PD_NIXL))
    calls = _counting(conn, monkeypatch)
    for rid, params in (("plain", None), ("producer", {"do_remote_decode": True}),
                        ("off", {"do_remote_prefill": False})):
        r = _request(rid, params)
        assert conn.get_num_new_matched_tokens(r, 0) == (0, False)
        conn.update_state_after_alloc(r, _blocks(), 0)
    assert calls == []
    params = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_block_ids": [1, 2, 3],
              "remote_host": "127.0.0.1", "remote_port": 7000, "remote_request_id": "p-1", "tp_size": 1}
    r = _request("consumer", params)
    assert conn.get_num_new_matched_tokens(r, 0) == (40, True)
    conn.update_state_after_alloc(r, _blocks(), 40)
    assert calls == ["get_num_new_matched_tokens", "update_state_after_alloc"]
    (load,) = conn.build_connector_meta(_empty_output()).payload.loads
    assert [list(g) for g in load.local_block_ids] == [[4, 5, 6]]
    conn.shutdown()


def test_offload_backend_is_asked_about_every_request(env, monkeypatch):
    from kvconnect.bench import vllm_env as B

    conn = B.build_connector(env, "KVConnect", "kv_both",
                             {"backend": "cpu_offload", "cpu_bytes_to_use": env.bytes_per_block * 8})
    calls = _counting(conn, monkeypatch)
    r = _request("plain", None)
    conn.get_num_new_matched_tokens(r, 0)
    conn.update_state_after_alloc(r, _blocks(), 0)
    assert calls == ["get_num_new_matched_tokens", "update_state_after_alloc"]
    conn.shutdown()


def _empty_output():
    from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput

    return SchedulerOutput(
        scheduled_new_reqs=[], scheduled_cached_reqs=CachedRequestData(
            req_ids=[], resumed_req_ids=set(), new_token_ids=[], all_token_ids={}, new_block_ids=[],
            num_computed_tokens=[], num_output_tokens=[]),
        num_scheduled_tokens={}, total_num_scheduled_tokens=0, scheduled_spec_decode_tokens={},
        scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[],
    )


def test_finish_reason_of_vllm_requests_named_once_per_status():
    pytest.importorskip("vllm")
    from vllm.v1.request import RequestStatus

    from kvconnect.adapters import vllm_translate as tr

    want = {RequestStatus.FINISHED_LENGTH_CAPPED: "length", RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.RUNNING: None, RequestStatus.WAITING: None}
    r = _request("r", None)
    for _ in range(2):  # the second round is answered from the per-status cache
        for status, word in want.items():
            r.status = status
            assert tr.finish_reason(r) == word, status
    assert all(s in tr._STATUS_WORDS for s in want)
    assert tr.VllmRequestView(r).finish_reason is None  # the last status set: WAITING
    r.status = RequestStatus.FINISHED_STOPPED
    assert tr.VllmRequestView(r).finish_reason == "stop"
    assert tr.VllmRequestView(r, with_finish=False).finish_reason is None
    plain = type(
        "R", (), {"status": int(RequestStatus.FINISHED_STOPPED), "get_finished_reason": lambda self: None}
    )()
    assert tr.finish_reason(plain) is None  # an int equal to a member is not that member


def test_step_is_translated_only_for_backends_that_read_it(env, monkeypatch):
    from kvconnect.adapters import vllm_translate as tr
    from kvconnect.bench import vllm_env as B

    translated = []
    real = tr.step_view
    monkeypatch.setattr(tr, "step_view", lambda so: translated.append(so) or real(so))
    pd = B.build_connector(env, "KVConnect", "kv_consumer", dict(B.PD_NIXL))
    off = B.build_connector(env, "KVConnect", "kv_both",
                            {"backend": "cpu_offload", "cpu_bytes_to_use": env.bytes_per_block * 8})
    both = B.build_connector(env, "KVConnect", "kv_both", {"backends": [
        dict(B.PD_NIXL), {"backend": "cpu_offload", "cpu_bytes_to_use": env.bytes_per_block * 8}]})
    pd.build_connector_meta(_empty_output())
    assert translated == []
    for conn in (off, both):  # offload reads the scheduled requests; so does a composition with it
        conn.build_connector_meta(so := _empty_output())
        assert translated[-1] is so
    for conn in (pd, off, both):
        conn.shutdown()


def test_steps_with_nothing_to_send_reuse_one_metadata_object(env):
    from kvconnect.bench import vllm_env as B

    conn = B.build_connector(env, "KVConnect", "kv_consumer", dict(B.PD_NIXL))
    first = conn.build_connector_meta(_empty_output())
    assert conn.build_connector_meta(_empty_output()) is first and first.payload.is_empty()
    params = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_block_ids": [1, 2, 3],
              "remote_host": "127.0.0.1", "remote_port": 7000, "remote_request_id": "p-1", "tp_size": 1}
    r = _request("consumer", params)
    conn.get_num_new_matched_tokens(r, 0)
    conn.update_state_after_alloc(r, _blocks(), 40)
    loaded = conn.build_connector_meta(_empty_output())
    assert loaded is not first and [x.request_id for x in loaded.payload.loads] == ["consumer"]
    after = conn.build_connector_meta(_empty_output())
    assert after is not loaded and after.payload.is_empty()  # a step's loads are sent once
    conn.shutdown()
