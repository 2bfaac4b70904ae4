"""What routers and operators see of kvconnect's CPU tier on a real vLLM (CPU) server.

One server: ``{"backend":"cpu_offload"}`` with a host tier of 12 blocks (so stores evict), vLLM's
KV cache events published over ZMQ (``--kv-events-config``), dev mode for ``/reset_prefix_cache``.
A subscriber built only from vLLM's published types (``KVEventBatch``, msgpack) keeps the index a
router would keep, per medium. Checks: every CPU block arrives as ``BlockStored`` with
``medium="CPU"`` and the same hash vLLM published for that block on the device; eviction arrives as
``BlockRemoved``; the subscriber's CPU index is exactly what the tier holds (its hits and misses
agree); the transfer histograms count exactly the transfers done; ``kvconnect top --once`` shows
them.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.e2e import kvc

if kvc.deps_missing():
    pytest.skip(f"not installed: {', '.join(kvc.deps_missing())}", allow_module_level=True)

from kvconnect.testing import servers as S  # noqa: E402
from kvconnect.testing import tiny_models as T  # noqa: E402
from tests.e2e.kv_subscriber import Subscriber, subscribed  # noqa: E402

pytestmark = pytest.mark.e2e

TIER_BLOCKS = 12
PROMPT_TOKENS = 200  # 6 full blocks of 32 stored per request (with 4 output tokens)
OUT = 4


def metric(url: str, name: str, **labels: str) -> float:
    """A metric that must exist (a missing one is an error, never a zero)."""
    m = S.get_metrics(url)
    names = {name, name + "_total"}
    want = set(labels.items())
    hits = [v for (n, lab), v in m.items() if n in names and want <= set(lab)]
    if not hits:
        raise AssertionError(f"/metrics has no {name}{labels}")
    return sum(hits)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = T.cached("llama_gqa")
    wd = tmp_path_factory.mktemp("kvc_events")
    sub, events_args = subscribed()
    block_bytes = 2 * 2 * 64 * 32 * 2 * 4  # layers x KV heads x head dim x block x (K, V) x float32
    try:
        with kvc.Group() as g:
            srv = kvc.server(
                model,
                wd,
                "events",
                "0-1",
                kvc.kvconnect(kvc.offload(TIER_BLOCKS * block_bytes)),
                env={"VLLM_SERVER_DEV_MODE": "1"},
                args=events_args,
            )
            g.start(srv)
            yield {"srv": srv, "sub": sub}
    finally:
        sub.close()


def _settle(sub: Subscriber, expect_cpu_events: int, timeout: float = 20.0):
    """Wait until the CPU tier's events have arrived (stores finish after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = sub.snapshot()
        if snap[3].get("CPU", 0) >= expect_cpu_events or time.monotonic() > deadline:
            time.sleep(0.5)
            return sub.snapshot()
        time.sleep(0.1)


def _ext_hits_of(url: str, prompt: list[int]) -> float:
    S.post_json(url + "/reset_prefix_cache", {}, timeout=30)
    before = metric(url, "vllm:external_prefix_cache_hits")
    S.completion(url, prompt, max_tokens=OUT)
    time.sleep(1.0)
    return metric(url, "vllm:external_prefix_cache_hits") - before


@pytest.mark.sweep("gqa-offload-events")
def test_router_index_of_the_cpu_tier_is_exact_and_joins_the_device_hashes(env, request):
    srv, sub = env["srv"], env["sub"]
    url = srv.url
    a, b, c = (kvc.prompt_ids(5000 + i, PROMPT_TOKENS) for i in range(3))
    S.completion(url, a, max_tokens=OUT)
    S.completion(url, b, max_tokens=OUT)
    held, by_tok, removed, stored, errors = _settle(sub, 2)
    assert not errors, errors
    assert len(held.get("CPU", ())) == 12, f"CPU tier after A and B: {len(held.get('CPU', ()))} blocks"
    # every CPU block joins a device block of the same tokens, by the same hash
    cpu = {t: h for (m, t), h in by_tok.items() if m == "CPU"}
    dev = {t: h for (m, t), h in by_tok.items() if m != "CPU"}
    assert cpu and all(dev.get(t) == h for t, h in cpu.items()), "CPU hashes differ from the device's"
    assert metric(url, "vllm:kvconnect_tier_held_blocks", backend="cpu_offload") == 12

    # A again, from the CPU tier: a hit for all 6 blocks, and it becomes the most recent
    assert _ext_hits_of(url, a) == 6 * 32
    # C evicts B's blocks (the least recently used): the subscriber sees them go
    S.completion(url, c, max_tokens=OUT)
    held, by_tok, removed, stored, errors = _settle(sub, 3)
    assert not errors, errors
    hashes = {name: [by_tok[("CPU", tuple(p[i * 32:(i + 1) * 32]))] for i in range(6)] for name, p in
              (("a", a), ("c", c))}
    b_hashes = {dev[tuple(b[i * 32:(i + 1) * 32])] for i in range(6)}
    assert held["CPU"] == set(hashes["a"]) | set(hashes["c"]), "router index != what the tier should hold"
    assert b_hashes <= removed.get("CPU", set()), "B's evicted blocks were not reported removed"
    # the index is exact: what it says is held hits, what it says is gone misses
    assert _ext_hits_of(url, c) == 6 * 32
    assert _ext_hits_of(url, b) == 0

    # histograms count the transfers done: stores of A, B, C (and of B again), loads of A and C
    deadline = time.monotonic() + 15
    while True:
        loads = metric(url, "vllm:kvconnect_transfer_seconds_count", backend="cpu_offload", direction="load")
        stores = metric(
            url, "vllm:kvconnect_transfer_seconds_count", backend="cpu_offload", direction="store"
        )
        if (loads, stores) == (2, 4) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (loads, stores) == (2, 4), (loads, stores)
    assert metric(url, "vllm:kvconnect_transfer_bytes_count", backend="cpu_offload", direction="load") == 2
    assert metric(url, "vllm:kvconnect_transfer_bytes_sum", backend="cpu_offload", direction="load") == \
        metric(url, "vllm:kvconnect", stat="cpu_offload.load_bytes")
    assert metric(url, "vllm:kvconnect_load_wait_seconds_count") == 2
    assert metric(url, "vllm:kvconnect", stat="cpu_offload.load_failures") == 0  # declared: present at 0
    kvc.note(request, f"CPU tier: {stored.get('CPU')} BlockStored, {len(removed.get('CPU', ()))} blocks "
                      f"BlockRemoved; router index == tier (12 blocks); hashes == device; "
                      f"histograms: {loads:.0f} loads, {stores:.0f} stores")

    # kvconnect top --once reads the same server
    out = subprocess.run([sys.executable, "-m", "kvconnect.cli", "top", "--once", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {tuple(ln.split()[:2]): ln.split() for ln in out.stdout.splitlines() if ln.strip()}
    assert rows.get(("cpu_offload", "load"), [None] * 3)[2] == "2", (
        f"top does not show the 2 loads:\n{out.stdout}"
    )
    assert rows.get(("cpu_offload", "store"), [None] * 3)[2] == "4", out.stdout
    assert "host 384" in out.stdout, f"top does not show the CPU tier's hits:\n{out.stdout}"
