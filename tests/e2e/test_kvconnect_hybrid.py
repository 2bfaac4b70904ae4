"""kvconnect P/D (NIXL pull) of a hybrid model on real vLLM (CPU) servers through vllm-router.

The tiny Gemma-3 has layers sliding, sliding, full (x2) with a 64-token window; vLLM makes three
KV-cache groups (two sliding-window groups, one full) whose layers share one storage, and hands
out null block 0 for window blocks that fell out. The transfer must move every group's blocks
(and skip the null ones), and the decode output must equal a single instance.
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


@pytest.mark.sweep("hybrid-pull-router")
def test_hybrid_pd_pull_equals_single_instance(tmp_path_factory, request):
    model = T.cached("hybrid")
    wd = tmp_path_factory.mktemp("kvc_hybrid")
    with kvc.Group() as g:
        single = kvc.server(model, wd, "single", "0-1")
        p = kvc.server(model, wd, "prefill", "0", kvc.kvconnect(kvc.nixl(S.free_port())))
        d = kvc.server(model, wd, "decode", "1", kvc.kvconnect(kvc.nixl(S.free_port()), policy="fail"))
        g.start(single, p, d)
        want = kvc.request_set(single.url)
        # The comparison means something only if the output depends on the KV: different prompts
        # give different outputs, none of them one token repeated.
        T.check_outputs_varied([want[f"cmpl/{n}"] for n in kvc.PROMPTS]
                               + [want[f"chat/{n}"] for n in kvc.CHAT_PROMPTS], min_distinct=4)
        single.stop()
        router = g.router(p, d, wd, "router")
        loads0 = kvc.kvc_stat(d.url, "nixl.loads_done")
        got = kvc.request_set(router.url)
        kvc.assert_same(got, want, "kvconnect hybrid P/D vs single instance", p, d)
        time.sleep(1.5)
        loads = kvc.kvc_stat(d.url, "nixl.loads_done") - loads0
        assert loads >= len(got), f"kvconnect reports {loads} loads for {len(got)} requests"
        kvc.note(request, f"{len(got)}/{len(got)} outputs == single (prompts up to 113 tokens > 64-token "
                          f"window); kvconnect loads {loads:.0f}")
