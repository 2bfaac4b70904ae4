"""The kvconnect end-to-end SWEEP: which configurations must run (the machinery that enforces it
and prints the table is :mod:`kvconnect.testing.sweep`).

Every test of a sweep configuration carries ``@pytest.mark.sweep("<config id>")``; a configuration
listed here that did not run and pass fails the run, unless ``KVCONNECT_E2E_PARTIAL=1`` asks for a
subset on purpose.
"""

from __future__ import annotations

from kvconnect.testing.sweep import SweepConfig, SweepPlugin

#: Every configuration the sweep must run (models x modes x block sizes).
SWEEP: tuple[SweepConfig, ...] = (
    SweepConfig("gqa-single-baseline", "gqa", "single", "32", "reference outputs, varied and deterministic"),
    SweepConfig(
        "gqa-pull-router-name",
        "gqa",
        "P/D pull",
        "P32->D32",
        "router, kv_connector=KVConnect; cmpl+stream+chat, 3 prompt lengths == single",
    ),
    SweepConfig(
        "gqa-push-router-modpath",
        "gqa",
        "P/D push",
        "P32->D32",
        "router, kv_connector_module_path form; == single",
    ),
    SweepConfig("gqa-pull-mixed-bs", "gqa", "P/D pull", "P64->D32", "router; block sizes differ; == single"),
    SweepConfig(
        "gqa-prefill-killed-fail",
        "gqa",
        "P/D pull, policy fail",
        "P32->D32",
        "prefill killed before decode: clean error, no hang",
    ),
    SweepConfig(
        "gqa-offload-single",
        "gqa",
        "cpu_offload",
        "32",
        "shared prefix served from the CPU tier after local eviction; == single",
    ),
    SweepConfig(
        "gqa-offload-events",
        "gqa",
        "cpu_offload + vLLM KV events (ZMQ)",
        "32",
        "router-style subscriber's CPU index == tier across stores/evictions; hashes == device; "
        "histogram counts == transfers; kvconnect top --once",
    ),
    SweepConfig(
        "gqa-pull+offload-decode",
        "gqa",
        "P/D pull + cpu_offload (decode)",
        "P32->D32",
        "router P/D == single; repeated prefix loaded from CPU the second time",
    ),
    SweepConfig(
        "gqa-prefill-killed-recompute",
        "gqa",
        "P/D pull + cpu_offload, policy recompute",
        "P32->D32",
        "prefill killed before decode: recomputed, == single",
    ),
    SweepConfig(
        "gqa-pull-sustained-load",
        "gqa",
        "P/D pull, concurrent clients, client aborts",
        "P32->D32",
        "hundreds of requests, some hung up mid-flight: completed == single, no block or request left",
    ),
    SweepConfig(
        "gqa-mooncake-cross-instance",
        "gqa",
        "mooncake shared tier, two instances",
        "32",
        "A stores long prompts; fresh B serves them from the store (external hits); == single",
    ),
    SweepConfig(
        "gqa-mooncake-store-killed",
        "gqa",
        "mooncake, policy recompute",
        "32",
        "holder then master killed mid-run: both instances == single, no hang; restarted store hit again",
    ),
    SweepConfig("mla-pull-router", "mla", "P/D pull", "P16->D16", "== vLLM NixlConnector MLA P/D"),
    SweepConfig(
        "hybrid-mooncake-cross-instance",
        "hybrid",
        "mooncake shared tier, two instances, KV events",
        "32",
        "3 KV-cache groups: A stores (window blocks only), fresh B hits from the store; == single; "
        "A's STORAGE BlockStored hashes == device",
    ),
    SweepConfig(
        "hybrid-pull-router",
        "hybrid",
        "P/D pull",
        "P32->D32",
        "3 KV-cache groups (2 sliding + full), decode [nixl, cpu_offload]; == single",
    ),
    SweepConfig(
        "hybrid-pull+offload-decode",
        "hybrid",
        "P/D pull + cpu_offload (decode)",
        "P32->D32",
        "long prompts via router (NIXL), then to decode alone: from its CPU tier; == single",
    ),
    SweepConfig(
        "hybrid-pull-tp2to1",
        "hybrid",
        "P/D pull, prefill TP 2",
        "P32->D32",
        "prefill TP 2 (both ranks on core 0) -> decode TP 1; == single",
    ),
    SweepConfig("hybrid-pull-tp2to2", "hybrid", "P/D pull, TP 2 both", "P32->D32", "TP 2 -> TP 2; == single"),
    SweepConfig(
        "hybrid-pull-tp1to2", "hybrid", "P/D pull, decode TP 2", "P32->D32", "TP 1 -> TP 2; == single"
    ),
    SweepConfig(
        "hybrid-tp2-decode-rank-fail",
        "hybrid",
        "P/D pull, decode TP 2, policy fail",
        "P32->D32",
        "one decode rank's load fails: the request fails once, at once; the decode serves on",
    ),
    SweepConfig(
        "gqa-pull-2p2d-router",
        "gqa",
        "P/D pull, 2 prefill + 2 decode",
        "P32->D32",
        "one router, concurrent clients: == single, every instance a share, nothing left",
    ),
    SweepConfig(
        "mqa-bf16-pull-uneven-bs",
        "mqa",
        "P/D pull, bfloat16",
        "P96->D64",
        "1 KV head, head dim 80, 3 layers; block sizes neither dividing the other; == single",
    ),
)


def pytest_configure(config):
    config.pluginmanager.register(SweepPlugin(SWEEP), "kvconnect-sweep")
