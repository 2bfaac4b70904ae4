"""The shared tier on real vLLM (CPU) servers and a real Mooncake Store (master + memory holder on
loopback): two separate instances (not P/D), A and B, each with ``{"backend":"mooncake"}`` and
``kv_load_failure_policy: recompute``; a plain single instance gives the reference tokens.

* A serves long prompts and stores them; B, fresh, serves the same prompts from the store:
  vLLM's ``external_prefix_cache_hits`` rises on B and its tokens equal the single instance's.
* The memory holder dies, then the master: both instances keep serving the single instance's
  tokens (a hit whose objects are gone is recomputed), no request hangs; a restarted store is
  used again (A stores, B hits).
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)
pytest.importorskip("mooncake.store", reason="pip install 'kvconnect[mooncake]'")

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402
from kvconnect.testing.mooncake import MooncakeStore  # noqa: E402

pytestmark = pytest.mark.e2e

#: Prompt sets of 300 tokens (9 full blocks of 32 each): before the failure, while the store is
#: dead, after its restart.
SETS = {name: {f"{name}{i}": kvc.prompt_ids(7000 + 10 * j + i, 300) for i in range(2)}
        for j, name in enumerate(("first", "dead", "back"))}
REQUEST_TIMEOUT_S = 60.0


def _serve(url: str, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: S.completion(url, p, max_tokens=kvc.MAX_TOKENS, timeout=REQUEST_TIMEOUT_S).token_ids
            for k, p in prompts.items()}


def _stats(url: str) -> dict[str, float]:
    m = S.get_metrics(url)
    out = {"ext_hits": S.metric_value(m, "vllm:external_prefix_cache_hits")}
    reported = {dict(lab).get("stat") for (n, lab) in m if n.startswith("vllm:kvconnect")}
    for stat in ("objects_stored", "load_blocks", "load_failures", "save_failures", "saves_dropped"):
        # A counter appears once the backend first reports it; asserted rises need it present.
        name = f"mooncake.{stat}"
        out[stat] = S.metric_value(m, "vllm:kvconnect", stat=name) if name in reported else 0.0
    return out


def _delta(url: str, before: dict[str, float]) -> dict[str, float]:
    time.sleep(1.5)  # stats reach /metrics on the engine's next steps
    after = _stats(url)
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def _loopback_only(pids: list[int]) -> int:
    """Established TCP connections of these processes (and their children); asserts each has
    127.0.0.1 at both ends. Returns how many were seen."""
    import psutil

    pids = list(pids) + [c.pid for p in pids for c in psutil.Process(p).children(recursive=True)]
    out = subprocess.run(["ss", "-tnp", "state", "established"], capture_output=True, text=True,
                         timeout=10).stdout.splitlines()
    mine = [ln for ln in out if any(f"pid={p}," in ln for p in pids)]
    loop = ("127.0.0.1:", "[::ffff:127.0.0.1]:")  # Mooncake's sockets are IPv6, v4-mapped
    for ln in mine:
        cols = ln.split()
        local, peer = cols[2], cols[3]
        assert local.startswith(loop) and peer.startswith(loop), ln
    return len(mine)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = T.cached("llama_gqa")
    wd = tmp_path_factory.mktemp("kvc_mooncake")
    store = MooncakeStore(wd, segment_bytes=256 << 20).start()
    # Lookups are tried again 1 s after a failed store call (the default is 2 s).
    mc = store.config(retry_interval_s=1.0, load_timeout_s=10.0)
    try:
        with kvc.Group() as g:
            a = kvc.server(model, wd, "a", "0", kvc.kvconnect(mc, policy="recompute"))
            b = kvc.server(model, wd, "b", "1", kvc.kvconnect(mc, policy="recompute"),
                           env={"VLLM_SERVER_DEV_MODE": "1"})  # for /reset_prefix_cache
            single = kvc.server(model, wd, "single", "0-1")
            g.start(a, b, single)
            base = {}
            for prompts in SETS.values():
                base.update(_serve(single.url, prompts))
            single.stop()
            yield {"a": a, "b": b, "store": store, "base": base}
    finally:
        store.stop()


@pytest.mark.sweep("gqa-mooncake-cross-instance")
def test_b_serves_the_prefixes_a_stored_from_the_shared_tier(env, request):
    a, b, base = env["a"], env["b"], env["base"]
    before_a = _stats(a.url)
    got_a = _serve(a.url, SETS["first"])
    kvc.assert_same(got_a, {k: base[k] for k in got_a}, "instance A", a)
    da = _delta(a.url, before_a)
    assert da["objects_stored"] >= 2 * 9, f"A stored {da['objects_stored']} objects: {da}"
    before_b = _stats(b.url)
    got_b = _serve(b.url, SETS["first"])
    db = _delta(b.url, before_b)
    kvc.assert_same(got_b, {k: base[k] for k in got_b}, "instance B (from the shared tier)", b)
    assert db["ext_hits"] >= 2 * 9 * kvc.BLOCK, f"B's external prefix hits rose by {db['ext_hits']}: {db}"
    assert db["load_blocks"] >= 2 * 9, f"B loaded {db['load_blocks']} blocks from the store: {db}"
    pids = [p.pid for p in (a, b, env["store"].master, env["store"].holder) if p is not None]
    n = _loopback_only(pids)
    kvc.note(request, f"A stored {da['objects_stored']:.0f} objects; B: external hits "
                      f"{db['ext_hits']:.0f} tokens, {db['load_blocks']:.0f} blocks loaded, == single; "
                      f"{n} TCP connections, all 127.0.0.1<->127.0.0.1")


@pytest.mark.sweep("gqa-mooncake-store-killed")
def test_a_dead_store_is_recomputed_and_a_restarted_store_is_used_again(env, request):
    a, b, store, base = env["a"], env["b"], env["store"], env["base"]
    # B has not seen these prompts; A stores them. Then the memory holder dies: the master still
    # lists the objects for a while, so B's hits fail to load and are recomputed.
    _serve(a.url, SETS["dead"])
    time.sleep(1.0)
    store.holder.stop(grace_s=0)
    before_b = _stats(b.url)
    t0 = time.monotonic()
    got = _serve(b.url, SETS["dead"])
    kvc.assert_same(got, {k: base[k] for k in got}, "B with the memory holder dead", b)
    # Then the master dies too, while both instances serve: they keep serving (lookups miss,
    # stores are dropped).
    with ThreadPoolExecutor(2) as pool:
        futs = {inst.name: pool.submit(_serve, inst.url, SETS["first"] | SETS["dead"]) for inst in (a, b)}
        time.sleep(0.5)
        store.kill()
        for inst in (a, b):
            got = futs[inst.name].result(timeout=2 * REQUEST_TIMEOUT_S)
            kvc.assert_same(got, {k: base[k] for k in got}, f"{inst.name} with the store dead", inst)
    dead_s = time.monotonic() - t0
    db = _delta(b.url, before_b)
    # The store comes back (empty). Mooncake's clients find the new master and holder by
    # themselves, in seconds: A stores the prompts (again on every finish, also from its own
    # prefix cache) until B, its own prefix cache emptied each time, hits them.
    store.start()
    t_restart = time.monotonic()
    while True:
        got_a = _serve(a.url, SETS["back"])
        kvc.assert_same(got_a, {k: base[k] for k in got_a}, "A after the restart", a)
        time.sleep(1.0)
        S.post_json(b.url + "/reset_prefix_cache", {}, timeout=30)
        before = _stats(b.url)
        got_b = _serve(b.url, SETS["back"])
        kvc.assert_same(got_b, {k: base[k] for k in got_b}, "B after the restart", b)
        d = _delta(b.url, before)
        if d["ext_hits"] > 0 or time.monotonic() - t_restart > 90:
            break
    back_s = time.monotonic() - t_restart
    assert d["ext_hits"] >= 9 * kvc.BLOCK, f"B did not hit the restarted store within 90 s: {d}"
    kvc.note(request, f"holder then master killed: {dead_s:.1f} s for 10 requests, all == single "
                      f"(B load failures {db['load_failures']:.0f}); {back_s:.0f} s after the restart B hit "
                      f"{d['ext_hits']:.0f} tokens")

