"""Two prefill and two decode instances behind one vllm-router (round robin), kvconnect NIXL pull,
concurrent clients: every output equals one instance's, every instance served a share, and
afterwards none of them holds a KV block or a request.

Prefill instances share core 0 and decode instances core 1 (one OMP thread each). Each decode
reads from whichever prefill the router picked for that request, so both peers are met by both
decodes: handshakes with several peers at once.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import load as L  # noqa: E402
from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402

pytestmark = pytest.mark.e2e

REQUESTS = 32
CONCURRENCY = 6


@pytest.mark.sweep("gqa-pull-2p2d-router")
def test_two_prefill_two_decode_behind_one_router(tmp_path_factory, request):
    model = T.cached("llama_gqa")
    wd = tmp_path_factory.mktemp("kvc_2p2d")
    reqs = L.mixed_requests(REQUESTS, vocab=T.VOCAB_SIZE, seed=23, abort_fraction=0.0)
    with kvc.Group() as g:
        single = kvc.server(model, wd, "single", "0-1")
        prefills = [kvc.server(model, wd, f"prefill-{i}", "0", kvc.kvconnect(kvc.nixl(S.free_port())))
                    for i in range(2)]
        decodes = [
            kvc.server(model, wd, f"decode-{i}", "1", kvc.kvconnect(kvc.nixl(S.free_port()), policy="fail"))
            for i in range(2)
        ]
        t0 = time.monotonic()
        g.start(single, *prefills, *decodes)
        started = time.monotonic() - t0
        ref = L.run_load(single.url, reqs, concurrency=CONCURRENCY)
        want = {k: v.token_ids for k, v in ref.results.items()}
        assert all(want.values()), "the single instance failed requests"
        single.stop()
        router = S.router_server(
            [p.url for p in prefills], [d.url for d in decodes], wd, name="router"
        ).start()
        g.callback(router.stop)
        router.wait_ready(time.monotonic() + S.ROUTER_START_DEADLINE_S)

        rep = L.run_load(router.url, reqs, concurrency=CONCURRENCY)
        errors = {k: r.error for k, r in rep.results.items() if r.error}
        assert not errors, f"{len(errors)} requests failed: {list(errors.items())[:3]}"
        bad = [k for k, r in rep.results.items() if r.token_ids != want[k]]
        assert not bad, f"{len(bad)}/{len(reqs)} outputs differ from the single instance, e.g. {bad[0]}"

        servers = prefills + decodes
        deadline = time.monotonic() + 30
        while True:
            left = {s.name: S.left_on_server(s.url) for s in servers}
            if all(v == 0 for side in left.values() for v in side.values()) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        time.sleep(1.5)  # stats reach /metrics on the next step
        share = {p.name: kvc.kvc_stat(p.url, "nixl.leases_done") for p in prefills}
        share.update({d.name: kvc.kvc_stat(d.url, "nixl.loads_done") for d in decodes})
        for name, n in share.items():
            assert n >= REQUESTS // 8, f"{name} served {n:.0f} of {REQUESTS} requests: {share}"
        # (a prompt shorter than the token the decode computes itself needs no load)
        assert sum(share[d.name] for d in decodes) <= REQUESTS, (
            f"decode loads {share} for {REQUESTS} requests"
        )
        for name, v in left.items():
            assert v == {"kv_cache_usage_perc": 0, "num_requests_running": 0, "num_requests_waiting": 0}, (
                f"{name} still holds KV blocks or requests: {v}")
        kvc.note(request, f"{REQUESTS} requests x{CONCURRENCY} clients == single; shares "
                          + ", ".join(f"{k} {v:.0f}" for k, v in share.items())
                          + f"; nothing left on 4 instances; 5 servers ready in {started:.0f} s")
