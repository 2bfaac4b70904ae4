"""kvconnect's CPU offload tier on real vLLM (CPU) servers, alone and composed with NIXL P/D, and
the load-failure path with ``kv_load_failure_policy: recompute``.

Servers (started in parallel, always torn down):

* ``offload`` — one instance, ``{"backend":"cpu_offload"}``, with a deliberately small local KV
  cache (``--num-gpu-blocks-override 40``): filler requests evict a prefix from vLLM's own prefix
  cache, so a later hit can only come from the CPU tier;
* ``prefill`` (NIXL pull) + ``decode`` (``{"backends":[nixl, cpu_offload]}``, policy
  ``recompute``, dev mode for ``/reset_prefix_cache``) behind vllm-router;
* ``single`` — only when the GQA module did not already leave reference outputs.

vLLM's MultiConnector semantics hold here: for a P/D request the NIXL child (first in order)
always has the hit and owns the load, so the decode-side CPU tier serves the prefix when the same
prompt comes back without transfer params (e.g. straight to the decode instance, or from a router
that fell back).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Collection

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402

pytestmark = pytest.mark.e2e

LOCAL_BLOCKS = 40  # local (vLLM) KV cache of the offload server, in 32-token blocks


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = T.cached("llama_gqa")
    wd = tmp_path_factory.mktemp("kvc_offload")
    pp, dp = S.free_port(), S.free_port()
    with kvc.Group() as g:
        off = kvc.server(model, wd, "offload", "0-1", kvc.kvconnect(kvc.offload()),
                         args=["--num-gpu-blocks-override", str(LOCAL_BLOCKS)])
        prefill = kvc.server(model, wd, "prefill", "0", kvc.kvconnect(kvc.nixl(pp)))
        decode = kvc.server(model, wd, "decode", "1",
                            kvc.kvconnect(kvc.nixl(dp), kvc.offload(), policy="recompute"),
                            env={"VLLM_SERVER_DEV_MODE": "1"})
        servers = [off, prefill, decode]
        single = None
        if "gqa" not in kvc.BASELINES:
            single = kvc.server(model, wd, "single", "0-1")
            servers.append(single)
        g.start(*servers)
        if single is not None:
            kvc.BASELINES["gqa"] = kvc.request_set(single.url)
            kvc.BASELINES["gqa-extras"] = kvc.extras(single.url)
            single.stop()
        router = g.router(prefill, decode, wd, "router")
        yield {"off": off, "prefill": prefill, "decode": decode, "router": router,
               "base": kvc.BASELINES["gqa"], "extras": kvc.BASELINES["gqa-extras"]}


STATS = {"cpu_load_blocks": "cpu_offload.load_blocks", "cpu_store_blocks": "cpu_offload.store_blocks",
         "nixl_loads": "nixl.loads_done", "nixl_failed": "nixl.loads_failed"}


def _counters(url: str, need: Collection[str] = ()) -> dict[str, float]:
    """vLLM's prefix-cache counters and the kvconnect stats of ``STATS``. A stat in ``need`` must
    exist (metric_value raises); any other this server has not exposed yet reads 0 (see
    kvc.kvc_stat_before): what a test asserts after its step is always in ``need``."""
    m = S.get_metrics(url)
    out = {"local_hits": S.metric_value(m, "vllm:prefix_cache_hits"),
           "ext_hits": S.metric_value(m, "vllm:external_prefix_cache_hits")}
    for k, stat in STATS.items():
        out[k] = (kvc.kvc_stat if k in need else kvc.kvc_stat_before)(url, stat)
    return out


def _delta(url: str, before: dict[str, float], need: Collection[str]) -> dict[str, float]:
    time.sleep(1.5)  # stats reach /metrics on the engine's next steps
    after = _counters(url, need)
    return {k: after[k] - before[k] for k in after}


@pytest.mark.sweep("gqa-offload-single")
def test_shared_prefix_is_served_from_cpu_tier_after_local_eviction(env, request):
    off, ex = env["off"], env["extras"]
    first = S.completion(off.url, kvc.EXTRA_PROMPTS["prefix+a"])
    assert first.token_ids == ex["prefix+a"], (
        "offload server differs from the single instance (first request)"
    )
    time.sleep(1.0)  # the store runs when the request finishes
    # Fill the small local cache with other prompts so the shared prefix is evicted locally.
    for i in range(5):
        S.completion(off.url, kvc.prompt_ids(4000 + i, 300), max_tokens=4)
    before = _counters(off.url)
    second = S.completion(off.url, kvc.EXTRA_PROMPTS["prefix+b"])
    d = _delta(off.url, before, need={"cpu_load_blocks"})
    assert second.token_ids == ex["prefix+b"], (
        f"prefix served from the CPU tier gives other tokens than the single instance\n{off.log_tail(30)}"
    )
    assert d["local_hits"] == 0, (
        f"vLLM's own prefix cache still served {d['local_hits']} tokens (not evicted)"
    )
    assert d["ext_hits"] >= 224, (
        f"external (CPU tier) hits {d['ext_hits']} tokens, expected the 256-token prefix"
    )
    assert d["cpu_load_blocks"] >= 7, f"kvconnect loaded {d['cpu_load_blocks']} blocks from the CPU tier"
    # Also plain requests through the offload server match the single instance.
    got = kvc.request_set(off.url)
    kvc.assert_same(got, env["base"], "offload server request set", off)
    kvc.note(request, f"2nd request: local hits 0, CPU-tier hits {d['ext_hits']:.0f} tokens "
                      f"({d['cpu_load_blocks']:.0f} blocks); outputs == single ({len(got) + 2} requests)")


@pytest.mark.sweep("gqa-pull+offload-decode")
def test_composed_decode_nixl_then_offload(env, request):
    router, decode = env["router"], env["decode"]
    before = _counters(decode.url)
    got = kvc.request_set(router.url)
    kvc.assert_same(got, env["base"], "P/D with composed decode", env["prefill"], decode)
    prompt = kvc.EXTRA_PROMPTS["repeat"]
    first = S.completion(router.url, prompt)
    assert first.token_ids == env["extras"]["repeat"]
    d1 = _delta(decode.url, before, need={"nixl_loads", "cpu_store_blocks"})
    assert d1["nixl_loads"] >= len(got) + 1, f"NIXL loads on the decode side: {d1}"
    assert d1["cpu_store_blocks"] > 0, f"the decode-side CPU tier stored nothing: {d1}"
    # The repeated prompt, with the decode's own prefix cache emptied: served from its CPU tier.
    S.post_json(decode.url + "/reset_prefix_cache", {}, timeout=30)
    before2 = _counters(decode.url)
    second = S.completion(decode.url, prompt)
    d2 = _delta(decode.url, before2, need={"cpu_load_blocks", "nixl_loads"})
    assert second.token_ids == env["extras"]["repeat"], "repeat served from the CPU tier differs"
    assert d2["local_hits"] == 0, f"local prefix cache still hit: {d2}"
    assert d2["cpu_load_blocks"] >= 6 and d2["ext_hits"] >= 192, f"repeat not loaded from the CPU tier: {d2}"
    assert d2["nixl_loads"] == 0
    kvc.note(
        request,
        f"{len(got) + 1} P/D outputs == single (NIXL loads {d1['nixl_loads']:.0f}, CPU stores "
        f"{d1['cpu_store_blocks']:.0f} blocks); repeat: CPU-tier hit {d2['ext_hits']:.0f} tokens",
    )
    # what an operator sees of the pair: `kvconnect top --once PREFILL DECODE`
    out = subprocess.run(
        [sys.executable, "-m", "kvconnect.cli", "top", "--once", env["prefill"].url, decode.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    views = {blk.split()[0]: blk for blk in out.stdout.split("\n\n") if blk.strip()}
    rows = {tuple(ln.split()[:2]): ln.split() for ln in views[decode.url].splitlines()}
    assert float(rows[("nixl", "load")][2]) >= d1["nixl_loads"], f"top shows no NIXL loads:\n{out.stdout}"
    assert float(rows[("cpu_offload", "load")][2]) >= 1, out.stdout


@pytest.mark.sweep("gqa-prefill-killed-recompute")
def test_prefill_killed_before_decode_is_recomputed_with_policy_recompute(env, request):
    prefill, decode = env["prefill"], env["decode"]
    prompt = kvc.EXTRA_PROMPTS["killed-recompute"]
    params = kvc.prefill_direct(prefill.url, prompt)
    prefill.stop(grace_s=0)
    before = _counters(decode.url)
    t0 = time.perf_counter()
    g = kvc.decode_direct(decode.url, prompt, params, timeout=90)
    took = time.perf_counter() - t0
    d = _delta(decode.url, before, need={"nixl_failed"})
    assert g.token_ids == env["extras"]["killed-recompute"], (
        f"recomputed output differs from the single instance\n{decode.log_tail(30)}"
    )
    assert took < 60, f"recompute after a failed load took {took:.0f} s"
    assert d["nixl_failed"] >= 1, f"kvconnect did not count a failed load: {d}"
    kvc.note(request, f"prefill dead: load failed, recomputed in {took:.1f} s, output == single")
