"""kvconnect P/D on real vLLM (CPU) servers with the tiny GQA Llama, through a real vllm-router.

One set of servers for the whole module (started in parallel, always torn down):

* ``single``   — one instance, the reference outputs (stopped once they are taken);
* ``p_pull``   — prefill, ``{"backend":"nixl","mode":"pull"}``, selected as ``"kv_connector":"KVConnect"``;
* ``p_push``   — prefill, ``mode: push``, selected by ``kv_connector_module_path`` instead;
* ``p64``      — prefill with block size 64 (pull), started when ``single`` is stopped;
* ``decode``   — block size 32, ``kv_load_failure_policy: fail`` (so a failed transfer is an error,
  never a silent recompute that would hide it), shared by three routers (pull, push, 64->32).

The transfer mode is the producer's choice: it is carried in the transfer params it returns, so one
decode instance serves pull and push producers alike.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    model = T.cached("llama_gqa")
    wd = tmp_path_factory.mktemp("kvc_gqa")
    ports = {k: S.free_port() for k in ("pull", "push", "p64", "decode")}
    with kvc.Group() as g:
        single = kvc.server(model, wd, "single", "0-1")
        p_pull = kvc.server(model, wd, "p_pull", "0", kvc.kvconnect(kvc.nixl(ports["pull"], "pull")))
        p_push = kvc.server(model, wd, "p_push", "0",
                            kvc.kvconnect(kvc.nixl(ports["push"], "push"), module_path=True))
        decode = kvc.server(model, wd, "decode", "1", kvc.kvconnect(kvc.nixl(ports["decode"]), policy="fail"))
        t0 = time.perf_counter()
        g.start(single, p_pull, p_push, decode)
        started_s = time.perf_counter() - t0
        # Reference outputs and single-instance latency, then give its memory to the 64-block prefill.
        S.completion(single.url, kvc.LATENCY_PROMPT)  # warm-up
        base = kvc.request_set(single.url)
        again = kvc.request_set(single.url)
        kvc.BASELINES["gqa-extras"] = kvc.extras(single.url)
        lat_single = kvc.best_latency(lambda: S.completion(single.url, kvc.LATENCY_PROMPT))
        single.stop()
        kvc.BASELINES["gqa"] = base
        p64 = kvc.server(model, wd, "p64", "0", kvc.kvconnect(kvc.nixl(ports["p64"])), block_size=64)
        g.start(p64, wait=False)
        r_pull = g.router(p_pull, decode, wd, "router_pull")
        r_push = g.router(p_push, decode, wd, "router_push")
        yield {
            "model": model, "wd": wd, "g": g, "base": base, "again": again, "lat_single": lat_single,
            "started_s": started_s, "p_pull": p_pull, "p_push": p_push, "p64": p64, "decode": decode,
            "r_pull": r_pull, "r_push": r_push,
        }


def _pd_run(request, env, router, prefill, label: str) -> None:
    decode = env["decode"]
    hits0 = kvc.counter(decode.url, "vllm:external_prefix_cache_hits")
    loads0 = kvc.kvc_stat_before(decode.url, "nixl.loads_done")
    got = kvc.request_set(router.url)
    kvc.assert_same(got, env["base"], f"{label} vs single instance", prefill, decode)
    time.sleep(1.5)  # vLLM publishes stats on its next step / log interval
    hits = kvc.counter(decode.url, "vllm:external_prefix_cache_hits") - hits0
    loads = kvc.kvc_stat(decode.url, "nixl.loads_done") - loads0
    n = len(got)
    assert hits > 0, f"{label}: the decode instance reports no external prefix-cache hits"
    assert loads >= n, f"{label}: kvconnect reports {loads} NIXL loads on the decode side for {n} requests"
    kvc.note(
        request,
        f"{n}/{n} outputs == single; decode external hits {hits:.0f} tokens, kvconnect loads {loads:.0f}",
    )


@pytest.mark.sweep("gqa-single-baseline")
def test_single_instance_reference_is_deterministic_and_varied(gqa, request):
    assert gqa["base"] == gqa["again"], "greedy output changed between two identical passes"
    for key, ids in gqa["base"].items():
        assert ids is not None and len(ids) == kvc.MAX_TOKENS, f"{key}: {ids!r}"
    T.check_outputs_varied([gqa["base"][f"cmpl/{n}"] for n in kvc.PROMPTS]
                           + [gqa["base"][f"chat/{n}"] for n in kvc.CHAT_PROMPTS], min_distinct=4)
    kvc.note(request, f"{len(gqa['base'])} requests, deterministic and varied; servers up in "
                      f"{gqa['started_s']:.0f} s; warm latency {gqa['lat_single'] * 1000:.0f} ms")


@pytest.mark.sweep("gqa-pull-router-name")
def test_pd_pull_through_router_equals_single_instance(gqa, request):
    _pd_run(request, gqa, gqa["r_pull"], gqa["p_pull"], "P/D pull")
    lat = kvc.best_latency(lambda: S.completion(gqa["r_pull"].url, kvc.LATENCY_PROMPT))
    request.node.user_properties.append(("pd_pull_warm_latency_s", lat))
    kvc.note(request, f"warm latency P/D {lat * 1000:.0f} ms vs single {gqa['lat_single'] * 1000:.0f} ms "
                      f"({lat / gqa['lat_single']:.1f}x)")


@pytest.mark.sweep("gqa-push-router-modpath")
def test_pd_push_through_router_equals_single_instance(gqa, request):
    _pd_run(request, gqa, gqa["r_push"], gqa["p_push"], "P/D push")
    sent = kvc.kvc_stat(gqa["p_push"].url, "nixl.bytes_sent")
    assert sent > 0, "the push-mode prefill reports no bytes written"
    lat = kvc.best_latency(lambda: S.completion(gqa["r_push"].url, kvc.LATENCY_PROMPT))
    kvc.note(request, f"prefill pushed {sent / 2**20:.1f} MiB; warm latency {lat * 1000:.0f} ms")


@pytest.mark.sweep("gqa-pull-mixed-bs")
def test_pd_pull_prefill_block_64_decode_block_32(gqa, request):
    p64 = gqa["p64"]
    p64.wait_ready(time.monotonic() + S.VLLM_START_DEADLINE_S)
    router = gqa["g"].router(p64, gqa["decode"], gqa["wd"], "router_64_32")
    _pd_run(request, gqa, router, p64, "P/D pull, prefill blocks 64, decode blocks 32")


@pytest.mark.parametrize("bad,field", [({"remote_port": "seven"}, "remote_port"),
                                       ({"remote_block_ids": [1]}, "remote_block_ids cover")])
def test_malformed_router_params_fail_the_request_naming_the_field(gqa, bad, field):
    # The decode's scheduler hands the router's params on unread; its worker refuses them before
    # any transfer, and vLLM's policy `fail` ends the request. The instance serves on.
    prefill, decode = gqa["p_pull"], gqa["decode"]
    prompt = kvc.prompt_ids(91, 70)
    params = dict(kvc.prefill_direct(prefill.url, prompt), **bad)
    rejected0 = kvc.kvc_stat(decode.url, "nixl.loads_rejected")
    t0 = time.perf_counter()
    try:
        g = kvc.decode_direct(decode.url, prompt, params, timeout=60)
        assert g.finish_reason not in ("length", "stop"), (
            f"completed ({g.finish_reason}) despite malformed params"
        )
    except S.ServerError:
        pass
    assert time.perf_counter() - t0 < 30, "a malformed load must fail at once, not at a deadline"
    assert field in decode.log_tail(n_lines=400, max_chars=200_000), f"the decode log does not name {field}"
    ok = S.completion(decode.url, kvc.PROMPTS["short"])
    assert ok.token_ids == gqa["base"]["cmpl/short"]
    time.sleep(1.5)  # vLLM publishes stats on its next step / log interval
    assert kvc.kvc_stat(decode.url, "nixl.loads_rejected") - rejected0 >= 1


@pytest.mark.sweep("gqa-prefill-killed-fail")
def test_prefill_killed_before_decode_fails_cleanly_with_policy_fail(gqa, request):
    prefill, decode = gqa["p_pull"], gqa["decode"]
    prompt = kvc.prompt_ids(77, 90)
    params = kvc.prefill_direct(prefill.url, prompt)
    prefill.stop(grace_s=0)  # SIGKILL-like: the blocks it advertised are gone with it
    t0 = time.perf_counter()
    err = None
    try:
        g = kvc.decode_direct(decode.url, prompt, params, timeout=90)
    except S.ServerError as e:
        err = str(e)
    took = time.perf_counter() - t0
    if err is None:
        assert g.finish_reason not in ("length", "stop"), (
            f"decode completed normally ({g.finish_reason}, {g.token_ids}) although the prefill was dead"
        )
        err = f"finish_reason={g.finish_reason}, {len(g.token_ids or [])} tokens"
    assert took < 60, f"the failed load took {took:.0f} s to report"
    # The decode instance is healthy afterwards: a plain request is served normally.
    ok = S.completion(decode.url, kvc.PROMPTS["short"])
    assert ok.token_ids == gqa["base"]["cmpl/short"]
    time.sleep(1.5)
    failed = kvc.kvc_stat(decode.url, "nixl.loads_failed")
    assert failed >= 1, "kvconnect does not count the failed load"
    kvc.note(
        request,
        f"error after {took:.1f} s ({err[:80]}); decode healthy afterwards; loads_failed={failed:.0f}",
    )
