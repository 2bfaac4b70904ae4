"""The shared tier on a hybrid model, on real vLLM (CPU) servers and a real Mooncake Store: two
separate instances A and B with ``{"backend":"mooncake"}``, a plain single instance for the
reference tokens. A publishes vLLM KV cache events to a router-style subscriber.

The tiny Gemma-3 has three KV-cache groups (two sliding-window groups with a 64-token window, one
full-attention group) whose layers share one storage. A stores, per prompt of 200 tokens (16
generated), the full-attention group's 6 full blocks and each sliding-window group's 2 window
blocks (blocks 4 and 5: vLLM has nulled the others when the request finishes); B, fresh, hits the
6 blocks from the store (external hits) and its tokens equal the single instance's. A's
subscriber sees each stored block as ``BlockStored`` with medium ``STORAGE`` under the hash vLLM
published for the same tokens on the device.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)
pytest.importorskip("mooncake.store", reason="pip install 'kvconnect[mooncake]'")

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402
from kvconnect.testing.mooncake import MooncakeStore  # noqa: E402
from tests.e2e.kv_subscriber import subscribed  # noqa: E402

pytestmark = pytest.mark.e2e

PROMPTS = {f"p{i}": kvc.prompt_ids(8200 + i, 200) for i in range(2)}
#: Objects A stores per prompt: 6 full-attention blocks and 2 window blocks of 2 sliding groups.
OBJECTS_PER_PROMPT = 6 + 2 * 2
HIT_TOKENS = 6 * kvc.BLOCK


def _serve(url: str) -> dict[str, list[int]]:
    return {
        k: S.completion(url, p, max_tokens=kvc.MAX_TOKENS, timeout=60).token_ids for k, p in PROMPTS.items()
    }


def _stat(url: str, name: str) -> float:
    return S.metric_value(S.get_metrics(url), "vllm:kvconnect", stat=f"mooncake.{name}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = T.cached("hybrid")
    wd = tmp_path_factory.mktemp("kvc_mooncake_hybrid")
    sub, events_args = subscribed()
    store = MooncakeStore(wd, segment_bytes=256 << 20).start()
    mc = store.config(load_timeout_s=10.0)
    try:
        with kvc.Group() as g:
            a = kvc.server(model, wd, "a", "0", kvc.kvconnect(mc, policy="recompute"),
                           args=events_args)
            b = kvc.server(model, wd, "b", "1", kvc.kvconnect(mc, policy="recompute"))
            single = kvc.server(model, wd, "single", "0-1")
            g.start(a, b, single)
            base = _serve(single.url)
            T.check_outputs_varied(list(base.values()), min_distinct=2)
            single.stop()
            yield {"a": a, "b": b, "base": base, "sub": sub}
    finally:
        sub.close()
        store.stop()


@pytest.mark.sweep("hybrid-mooncake-cross-instance")
def test_b_serves_the_hybrid_prefixes_a_stored_and_a_publishes_them_as_storage(env, request):
    a, b, base, sub = env["a"], env["b"], env["base"], env["sub"]
    got_a = _serve(a.url)
    kvc.assert_same(got_a, base, "instance A", a)
    deadline = time.monotonic() + 20
    while _stat(a.url, "objects_stored") < 2 * OBJECTS_PER_PROMPT and time.monotonic() < deadline:
        time.sleep(0.5)  # stores complete after the responses
    stored = _stat(a.url, "objects_stored")
    assert stored == 2 * OBJECTS_PER_PROMPT, f"A stored {stored} objects"

    hits0, loads0 = (
        S.metric_value(S.get_metrics(b.url), "vllm:external_prefix_cache_hits"),
        _stat(b.url, "load_blocks"),
    )
    got_b = _serve(b.url)
    kvc.assert_same(got_b, base, "instance B (from the shared tier)", b)
    time.sleep(1.5)  # stats reach /metrics on the engine's next steps
    hits = S.metric_value(S.get_metrics(b.url), "vllm:external_prefix_cache_hits") - hits0
    loads = _stat(b.url, "load_blocks") - loads0
    assert hits == 2 * HIT_TOKENS, f"B's external prefix hits rose by {hits}"
    assert loads == 2 * OBJECTS_PER_PROMPT, f"B loaded {loads} objects"

    # A's events: every stored block of the prompts, medium STORAGE, under the device's hash.
    deadline = time.monotonic() + 20
    while True:
        held, by_tok, _removed, n_events, errors = sub.snapshot()
        if len(held.get("STORAGE", ())) >= 2 * 6 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not errors, errors
    storage = {t: h for (m, t), h in by_tok.items() if m == "STORAGE"}
    dev = {t: h for (m, t), h in by_tok.items() if m not in ("STORAGE", "CPU")}
    want = {tuple(p[i * kvc.BLOCK : (i + 1) * kvc.BLOCK]) for p in PROMPTS.values() for i in range(6)}
    assert set(storage) == want, f"STORAGE events cover {len(storage)} blocks, want {len(want)}"
    assert all(dev.get(t) == h for t, h in storage.items()), "STORAGE hashes differ from the device's"
    kvc.note(request, f"A stored {stored:.0f} objects (3 groups, window blocks only); B: external hits "
                      f"{hits:.0f} tokens, {loads:.0f} objects loaded, == single; A published "
                      f"{n_events.get('STORAGE', 0)} STORAGE BlockStored events, hashes == device")
