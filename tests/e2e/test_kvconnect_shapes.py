"""kvconnect P/D (NIXL pull) on a model of another shape than the GQA sweep model, on real vLLM
(CPU) servers through vllm-router: one KV head (MQA), head dim 80, three layers, bfloat16, and
block sizes where neither divides the other (prefill 96, decode 64), so every decode block is
assembled from pieces of two prefill blocks. The decode output must equal a single instance with
the decode's block size.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402

pytestmark = pytest.mark.e2e

P_BLOCK, D_BLOCK, DTYPE = 96, 64, "bfloat16"
#: Prompt lengths around both block sizes: under one block, exactly one of each, one token past,
#: and spanning several blocks of both.
LENGTHS = (5, 63, 64, 65, 96, 97, 191, 300)


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(96064)
    return {f"len{n}": [rng.randrange(8, T.VOCAB_SIZE) for _ in range(n)] for n in LENGTHS}


def _server(model, wd, name, cpus, kv=None, block_size=D_BLOCK):
    env = dict(S.NIXL_CPU_ENV) if kv else {}
    return S.vllm_server(model, wd, name=name, cpus=cpus, kv_transfer_config=kv, block_size=block_size,
                         dtype=DTYPE, extra_env=env)


@pytest.mark.sweep("mqa-bf16-pull-uneven-bs")
def test_mqa_bf16_pd_with_uneven_block_sizes_equals_single_instance(tmp_path_factory, request):
    model = T.cached("llama_mqa")
    wd = tmp_path_factory.mktemp("kvc_mqa")
    prompts = _prompts()
    with kvc.Group() as g:
        single = _server(model, wd, "single", "0-1")
        p = _server(model, wd, "prefill", "0", kvc.kvconnect(kvc.nixl(S.free_port())), block_size=P_BLOCK)
        d = _server(model, wd, "decode", "1", kvc.kvconnect(kvc.nixl(S.free_port()), policy="fail"))
        g.start(single, p, d)
        want = {k: S.completion(single.url, ids, max_tokens=12).token_ids for k, ids in prompts.items()}
        T.check_outputs_varied(list(want.values()), min_distinct=4)
        single.stop()
        router = g.router(p, d, wd, "router")
        loads0 = kvc.kvc_stat_before(d.url, "nixl.loads_done")
        got = {k: S.completion(router.url, ids, max_tokens=12).token_ids for k, ids in prompts.items()}
        kvc.assert_same(got, want, f"kvconnect MQA {DTYPE} P{P_BLOCK}->D{D_BLOCK} vs single instance", p, d)
        time.sleep(1.5)
        loads = kvc.kvc_stat(d.url, "nixl.loads_done") - loads0
        failed = kvc.kvc_stat(d.url, "nixl.loads_failed")
        assert loads >= len(got) and failed == 0, (
            f"kvconnect reports {loads} loads, {failed} failed, for {len(got)}"
        )
        kvc.note(
            request,
            f"{len(got)}/{len(got)} outputs == single (prompts {LENGTHS[0]}-{LENGTHS[-1]} tokens); "
            f"kvconnect loads {loads:.0f}",
        )
