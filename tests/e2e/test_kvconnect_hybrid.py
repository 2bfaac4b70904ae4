"""kvconnect on a hybrid model on real vLLM (CPU) servers through vllm-router: P/D (NIXL pull) into
a decode instance composing ``[nixl, cpu_offload]``, and the decode's CPU tier serving the same
long prompts afterwards.

The tiny Gemma-3 has layers sliding, sliding, full (x2) with a 64-token window; vLLM makes three
KV-cache groups (two sliding-window groups, one full) whose layers share one storage, and hands
out null block 0 for window blocks that fell out. The transfer must move every group's blocks
(and skip the null ones), and the decode output must equal a single instance.

One deployment serves both rows (single for the reference, prefill, composed decode, router): the
NIXL child comes first, so P/D requests load exactly as with a NIXL-only decode.

Which repeats the CPU tier can serve follows vLLM's sliding-window allocator (see
``kvconnect/backends/cpu_offload/groups.py``): with the default ``store_mode: finish`` a request
stores the sliding-window blocks vLLM still holds when it finishes, i.e. the window at its end, so
a repeat of the same prompt hits when the prompt's last full block is still inside that window
after the generated tokens (prompt length mod 32 plus the generated tokens below 32 here). The
prompts below are chosen so (200 = 6x32 + 8, 136 = 4x32 + 8, 16 tokens generated).
"""

from __future__ import annotations

import time
from collections.abc import Collection

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402

pytestmark = pytest.mark.e2e

#: Long prompts sent through the router, then straight to the decode instance.
REPEATS = {"r200": kvc.prompt_ids(5200, 200), "r136": kvc.prompt_ids(5136, 136)}
#: Group-blocks a CPU-tier hit on each loads: the full-attention group's blocks up to the last
#: full block before the final token, plus the two window blocks of each sliding-window group.
REPEAT_BLOCKS = {"r200": 6 + 2 * 2, "r136": 4 + 2 * 2}
REPEAT_HIT_TOKENS = {"r200": 192, "r136": 128}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = T.cached("hybrid")
    wd = tmp_path_factory.mktemp("kvc_hybrid")
    with kvc.Group() as g:
        single = kvc.server(model, wd, "single", "0-1")
        p = kvc.server(model, wd, "prefill", "0", kvc.kvconnect(kvc.nixl(S.free_port())))
        d = kvc.server(model, wd, "decode", "1",
                       kvc.kvconnect(kvc.nixl(S.free_port()), kvc.offload(), policy="fail"),
                       env={"VLLM_SERVER_DEV_MODE": "1"})
        g.start(single, p, d)
        want = kvc.request_set(single.url)
        repeats = {
            k: S.completion(single.url, ids, max_tokens=kvc.MAX_TOKENS).token_ids
            for k, ids in REPEATS.items()
        }
        # The comparison means something only if the output depends on the KV: different prompts
        # give different outputs, none of them one token repeated.
        T.check_outputs_varied([want[f"cmpl/{n}"] for n in kvc.PROMPTS]
                               + [want[f"chat/{n}"] for n in kvc.CHAT_PROMPTS] + list(repeats.values()),
                               min_distinct=6)
        single.stop()
        router = g.router(p, d, wd, "router")
        yield {"prefill": p, "decode": d, "router": router, "want": want, "repeats": repeats}


STATS = {"cpu_load_blocks": "cpu_offload.load_blocks", "cpu_store_blocks": "cpu_offload.store_blocks",
         "nixl_loads": "nixl.loads_done"}


def _counters(url: str, tolerate: Collection[str] = ()) -> dict[str, float]:
    """vLLM's prefix-cache counters and kvconnect's; a kvconnect stat in ``tolerate`` that is not
    exposed yet reads 0 (see kvc.kvc_stat_before), any other must exist."""
    m = S.get_metrics(url)
    out = {"local_hits": S.metric_value(m, "vllm:prefix_cache_hits"),
           "ext_hits": S.metric_value(m, "vllm:external_prefix_cache_hits")}
    for k, stat in STATS.items():
        out[k] = (kvc.kvc_stat_before if k in tolerate else kvc.kvc_stat)(url, stat)
    return out


def _delta(url: str, before: dict[str, float], tolerate: Collection[str] = ()) -> dict[str, float]:
    time.sleep(1.5)  # stats reach /metrics on the engine's next steps
    after = _counters(url, tolerate)
    return {k: after[k] - before[k] for k in after}


@pytest.mark.sweep("hybrid-pull-router")
def test_hybrid_pd_pull_equals_single_instance(env, request):
    p, d = env["prefill"], env["decode"]
    loads0 = kvc.kvc_stat_before(d.url, "nixl.loads_done")
    got = kvc.request_set(env["router"].url)
    kvc.assert_same(got, env["want"], "kvconnect hybrid P/D vs single instance", p, d)
    time.sleep(1.5)
    loads = kvc.kvc_stat(d.url, "nixl.loads_done") - loads0
    assert loads >= len(got), f"kvconnect reports {loads} loads for {len(got)} requests"
    kvc.note(request, f"{len(got)}/{len(got)} outputs == single (prompts up to 113 tokens > 64-token "
                      f"window); kvconnect loads {loads:.0f}")


@pytest.mark.sweep("hybrid-pull+offload-decode")
def test_hybrid_repeats_come_from_the_decode_cpu_tier(env, request):
    router, d = env["router"], env["decode"]
    before = _counters(d.url, tolerate=STATS)
    for k, ids in REPEATS.items():
        g = S.completion(router.url, ids, max_tokens=kvc.MAX_TOKENS)
        assert g.token_ids == env["repeats"][k], f"P/D output of {k} differs from the single instance"
    d1 = _delta(d.url, before, tolerate={"cpu_load_blocks"})  # no CPU-tier load yet
    assert d1["nixl_loads"] >= len(REPEATS), f"P/D requests did not load over NIXL: {d1}"
    assert d1["cpu_store_blocks"] >= sum(REPEAT_BLOCKS.values()), (
        f"the decode-side CPU tier stored too little: {d1}"
    )
    # The same prompts straight to the decode instance, its own prefix cache emptied.
    S.post_json(d.url + "/reset_prefix_cache", {}, timeout=30)
    before2 = _counters(d.url, tolerate={"cpu_load_blocks"})
    for k, ids in REPEATS.items():
        g = S.completion(d.url, ids, max_tokens=kvc.MAX_TOKENS)
        assert g.token_ids == env["repeats"][k], (
            f"{k} served from the CPU tier differs from the single instance\n{d.log_tail(30)}")
    d2 = _delta(d.url, before2)
    assert d2["local_hits"] == 0, f"vLLM's own prefix cache still hit: {d2}"
    assert d2["nixl_loads"] == 0, f"a repeat went over NIXL: {d2}"
    assert d2["ext_hits"] == sum(REPEAT_HIT_TOKENS.values()), f"CPU-tier hits: {d2}"
    assert d2["cpu_load_blocks"] == sum(REPEAT_BLOCKS.values()), f"CPU-tier blocks loaded: {d2}"
    kvc.note(request, f"P/D: NIXL loads {d1['nixl_loads']:.0f}, CPU stores {d1['cpu_store_blocks']:.0f} "
                      f"group-blocks; repeats to decode: CPU-tier hits {d2['ext_hits']:.0f} tokens "
                      f"({d2['cpu_load_blocks']:.0f} group-blocks), local hits 0, NIXL 0; == single")
