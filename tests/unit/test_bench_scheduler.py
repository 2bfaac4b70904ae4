"""Smoke test of ``kvconnect bench scheduler`` with tiny counts, and of the report's tables."""

import json

import pytest

pytestmark = pytest.mark.unit


def test_targets_compare_pd_with_nixl_and_composed_with_multi():
    from kvconnect.bench.scheduler import targets

    rows = {
        "pd_producer": {
            "rows": {
                "k": {"kvconnect": True},
                "v": {"kvconnect": False, "connector": "NixlConnector", "kvconnect_ratio": 0.4},
            }
        },
        "composed_consumer": {
            "rows": {
                "k": {"kvconnect": True},
                "v": {"kvconnect": False, "connector": "MultiConnector", "kvconnect_ratio": 1.2},
            }
        },
    }
    t = targets({"block_sizes": {"16": rows}})
    assert t["pd_producer@16"]["met"] and not t["composed_consumer@16"]["met"]


def test_scheduler_bench_runs_kvconnect_and_vllm_connectors_on_the_same_requests(capsys):
    pytest.importorskip("vllm")
    from kvconnect.bench import report, scheduler

    rc = scheduler.main(["--quick", "--requests", "10", "--in-flight", "6", "--repeats", "1",
                         "--prompt-min", "64", "--prompt-max", "160", "--decode-max", "4",
                         "--workloads", "pd_consumer", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (per,) = out["block_sizes"].values()
    rows = per["pd_consumer"]["rows"]
    ours, theirs, floor = rows["kvconnect nixl"], rows["vLLM NixlConnector"], rows[scheduler.FLOOR]
    # same lifecycle for all: the same request-steps, every prompt token offered as a remote load
    assert ours["request_steps"] == theirs["request_steps"] == floor["request_steps"] > 0
    assert ours["external_tokens"] == theirs["external_tokens"] == floor["external_tokens"] > 0
    (target,) = out["targets"].values()
    assert target["floor_ratio"] == pytest.approx(
        floor["us_per_request_step"] / theirs["us_per_request_step"]
    )
    assert ours["us_per_request_step"] > 0 and theirs["kvconnect_ratio"] > 0
    assert "| pd_consumer | kvconnect nixl |" in "\n".join(report.md_scheduler(out))
