"""kvconnect's metrics on vLLM's /metrics: every declared name at zero from the start, histograms
per transfer, gauges, the engine's load wait; and every stat a backend reports is declared."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import pytest

from kvconnect.telemetry import GAUGES, TRANSFERS, merge_stats, record_transfer

pytestmark = pytest.mark.unit
LABELS = ["model_name", "engine"]
CONFIG = {"backends": [{"backend": "nixl"}, {"backend": "cpu_offload", "cpu_bytes_to_use": 1 << 20}]}


@pytest.fixture
def prom():
    pytest.importorskip("vllm")
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from kvconnect.adapters.vllm_stats import KVConnectPromMetrics

    reg = CollectorRegistry()
    types = {t: functools.partial(t, registry=reg) for t in (Gauge, Counter, Histogram)}
    cfg = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=CONFIG))
    m = KVConnectPromMetrics(cfg, types, LABELS, {0: ["tiny", "0"]})
    return m, reg


def samples(reg) -> dict[tuple, float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(reg, name: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": "tiny", "engine": "0", **labels}.items())))
    got = samples(reg)
    if key not in got:
        raise KeyError(f"no metric {name}{labels}")
    return got[key]


def test_every_declared_metric_exists_at_zero_before_any_transfer(prom):
    from kvconnect.registry import stat_names

    _, reg = prom
    for backend in ("nixl", "cpu_offload"):
        names = stat_names(backend)
        for c in names.counters:
            assert value(reg, "vllm:kvconnect_total", stat=f"{backend}.{c}") == 0
        for d in names.transfers:
            for fam in ("vllm:kvconnect_transfer_seconds", "vllm:kvconnect_transfer_bytes"):
                assert value(reg, fam + "_count", backend=backend, direction=d) == 0
        for g in names.gauges:
            assert value(reg, f"vllm:kvconnect_tier_{g}", backend=backend) == 0
    assert value(reg, "vllm:kvconnect_load_wait_seconds_count") == 0
    with pytest.raises(KeyError):
        value(reg, "vllm:kvconnect_tier_held_blocks", backend="nixl")  # nixl holds nothing


def test_histogram_counts_and_sums_equal_the_transfers_observed(prom):
    m, reg = prom
    w1, w2 = {}, {}
    for s, n in ((0.002, 4096), (0.004, 8192)):
        record_transfer(w1, "load", s, n)
    record_transfer(w2, "load", 0.010, 65536)
    record_transfer(w2, "store", 0.020, 1 << 20)
    w1["load_blocks"], w2["load_blocks"] = 2, 1
    data: dict = {}
    merge_stats(data, {"cpu_offload": w1})  # two workers' reports, merged as vLLM aggregates them
    merge_stats(data, {"cpu_offload": w2})
    m.observe(data, 0)
    assert value(reg, "vllm:kvconnect_transfer_seconds_count", backend="cpu_offload", direction="load") == 3
    assert value(reg, "vllm:kvconnect_transfer_seconds_sum", backend="cpu_offload", direction="load") == \
        pytest.approx(0.016)
    assert (
        value(reg, "vllm:kvconnect_transfer_bytes_sum", backend="cpu_offload", direction="load")
        == 4096 + 8192 + 65536
    )
    assert value(reg, "vllm:kvconnect_transfer_seconds_count", backend="cpu_offload", direction="store") == 1
    assert value(reg, "vllm:kvconnect_total", stat="cpu_offload.load_blocks") == 3
    # the sample sections never leak into the counter family
    assert not [k for k in samples(reg) if k[0] == "vllm:kvconnect_total" and "transfers" in str(k[1])]


def test_gauges_take_the_latest_report_and_load_waits_are_observed(prom):
    m, reg = prom
    m.observe({"cpu_offload": {GAUGES: {"held_blocks": 5, "held_bytes": 500}}}, 0)
    m.observe({"cpu_offload": {GAUGES: {"held_blocks": 3, "held_bytes": 300}},
               "_engine": {"load_wait": [0.01, 0.2]}}, 0)
    assert value(reg, "vllm:kvconnect_tier_held_blocks", backend="cpu_offload") == 3
    assert value(reg, "vllm:kvconnect_tier_held_bytes", backend="cpu_offload") == 300
    assert value(reg, "vllm:kvconnect_load_wait_seconds_count") == 2


def test_merging_concatenates_samples_and_replaces_gauges():
    a = {"x": {"n": 1, TRANSFERS: {"load": [[1.0, 2]]}, GAUGES: {"held_blocks": 4}}}
    merge_stats(a, {"x": {"n": 2, TRANSFERS: {"load": [[3.0, 4]]}, GAUGES: {"held_blocks": 1}}})
    assert a == {"x": {"n": 3, TRANSFERS: {"load": [[1.0, 2], [3.0, 4]]}, GAUGES: {"held_blocks": 1}}}


def test_log_line_reduces_samples_to_counts():
    pytest.importorskip("vllm")
    from kvconnect.adapters.vllm_stats import KVConnectStats

    s = KVConnectStats(data={"nixl": {"loads_done": 2, TRANSFERS: {"load": [[0.1, 10], [0.2, 20]]}}})
    assert s.reduce() == {"nixl.loads_done": 2, "nixl.transfers.load": 2}


def test_every_backend_declares_its_stats():
    from kvconnect.registry import BACKENDS, stat_names

    for name in BACKENDS:
        names = stat_names(name)
        assert names.counters, name


def _reported_keys(stats: dict) -> tuple[set[str], set[str]]:
    return ({k for k, v in stats.items() if isinstance(v, (int, float))},
            set((stats.get(TRANSFERS) or {}).keys()))


def test_cpu_offload_reports_only_declared_stats():
    import torch

    from kvconnect.registry import stat_names
    from tests.unit.test_offload_worker import load, random_caches, store, worker

    w = worker(random_caches("mla"), verify_checksums=True)
    try:
        got: dict = {}
        merge_stats(got, store(w, "a", [1, 2], [0, 1], [b"k1", b"k2"]).stats)
        merge_stats(got, load(w, "b", [3, 4], [0, 1], [b"k1", b"k2"]).stats)
        merge_stats(got, load(w, "c", [3], [0], [b"other"]).stats)  # key mismatch
        w.layers[0].pool[1].view(torch.uint8)[0] ^= 0xFF  # host memory corrupted
        merge_stats(got, load(w, "d", [5], [1], [b"k2"]).stats)  # checksum failure
    finally:
        w.shutdown()
    counters, transfers = _reported_keys(got)
    declared = stat_names("cpu_offload")
    assert {"load_blocks", "store_blocks", "key_mismatches", "checksum_failures"} <= counters
    assert counters <= set(declared.counters), counters - set(declared.counters)
    assert transfers == set(declared.transfers)


def test_pd_transfer_reports_only_declared_stats(engines):
    from kvconnect.registry import stat_names
    from tests.unit.pd_harness import decode_start, prefill, run_until

    P, D = engines("prefill"), engines("decode")
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    declared = set(stat_names("nixl").counters)
    for e in (P, D):
        assert set(e.stats) <= declared, set(e.stats) - declared
    assert D.stats["loads_done"] == 1


def test_scheduler_half_reports_tier_gauges_once_per_change():
    pytest.importorskip("vllm")
    from kvconnect.bench import vllm_env as B

    env = B.make_env(16, 64, 512)
    conn = B.build_connector(env, "KVConnect", "kv_both",
                             {"backend": "cpu_offload", "cpu_bytes_to_use": 8 * env.bytes_per_block})
    first = conn.get_kv_connector_stats()
    assert first.data == {"cpu_offload": {GAUGES: {"held_blocks": 0, "held_bytes": 0, "capacity_blocks": 8}}}
    assert conn.get_kv_connector_stats() is None  # unchanged: nothing to report
    conn._sched.index.reserve([b"k"])
    assert conn.get_kv_connector_stats().data["cpu_offload"][GAUGES]["held_blocks"] == 1


def test_engine_load_wait_runs_from_allocation_to_the_load_reported_received(monkeypatch):
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from kvconnect.bench import vllm_env as B

    env = B.make_env(16, 64, 512)
    conn = B.build_connector(env, "KVConnect", "kv_both",
                             {"backend": "cpu_offload", "cpu_bytes_to_use": 8 * env.bytes_per_block})
    monkeypatch.setattr(conn._sched, "update_state_after_alloc", lambda *a: None)
    monkeypatch.setattr(conn._sched, "update_worker_output", lambda *a: None)
    req = Request("w1", list(range(40)), SamplingParams(max_tokens=2), None)
    conn.get_kv_connector_stats()  # the first gauges
    conn.update_state_after_alloc(req, ([1, 2],), 32)
    time.sleep(0.02)
    conn.update_connector_output(KVConnectorOutput(finished_recving={"w1"}))
    (wait,) = conn.get_kv_connector_stats().data["_engine"]["load_wait"]
    assert 0.02 <= wait < 5
    conn.update_connector_output(KVConnectorOutput(finished_recving={"w1"}))  # reported once only
    assert conn.get_kv_connector_stats() is None


def test_mooncake_stats_are_typed_records_whose_names_are_the_declared_metrics():
    """The shared tier counts through records: every counter a worker reports is declared (on
    /metrics from the start, under the names it always had), and a misspelt one raises."""
    from kvconnect.backends.mooncake.stats import SchedulerCounters, WorkerCounters
    from kvconnect.registry import stat_names

    assert stat_names("mooncake").counters == WorkerCounters.names()
    assert set(WorkerCounters.names()) == {
        "load_bytes", "load_blocks", "load_seconds", "load_failures", "save_bytes", "save_seconds",
        "save_failures", "saves_dropped", "objects_present", "objects_stored", "objects_missing",
        "objects_corrupt", "put_failures", "deadline_misses",
    }
    w, s = WorkerCounters(), SchedulerCounters()
    w.objects_corrupt += 2
    assert w.take() == {"objects_corrupt": 2} and w.take() == {}
    with pytest.raises(AttributeError):
        w.object_corrupt += 1
    with pytest.raises(AttributeError):
        s.lookup_hit += 1
