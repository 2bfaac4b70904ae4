"""The test-server helpers' own rules: ports outside the kernel's ephemeral range, and the root
cause of a failed start taken from the current start's part of an appended log."""

from __future__ import annotations

import socket

import pytest

from kvconnect.testing import servers as S

pytestmark = pytest.mark.unit


def test_ports_are_free_distinct_and_below_the_ephemeral_range():
    lo, _ = S._ephemeral_range()
    ports = [S.free_port() for _ in range(20)] + [S.free_port_range(4) for _ in range(5)]
    assert len(set(ports)) == len(ports)
    assert all(p < lo for p in ports), (lo, ports)
    with socket.socket() as s:
        s.bind((S.HOST, ports[0]))  # really free


def test_first_traceback_is_the_one_of_the_latest_start(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("### 10:00:00 a: argv\nTraceback (most recent call last)\nOldError: before\n"
                   "### 10:01:00 a: argv\nstarting\nTraceback (most recent call last)\n"
                   "  File \"core.py\", line 1\nRootCause: port taken\nTraceback (most recent call last)\nEcho\n")
    out = S.first_traceback(log)
    assert "RootCause: port taken" in out and "OldError" not in out
    log.write_text("### 10:01:00 a: argv\nall fine\n")
    assert S.first_traceback(log) == ""
    assert S.first_traceback(tmp_path / "missing.log") == ""


_METRICS_TEXT = """# HELP vllm:kvconnect_total kvconnect transfer counters
# TYPE vllm:kvconnect_total counter
vllm:kvconnect_total{engine="0",model_name="tiny",stat="nixl.loads_done"} 3.0
vllm:kvconnect_total{engine="0",model_name="tiny",stat="nixl.loads_failed"} 0.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 64.0
"""


def test_metric_value_reads_a_present_metric_in_either_spelling():
    m = S.parse_prometheus(_METRICS_TEXT)
    assert S.metric_value(m, "vllm:kvconnect", stat="nixl.loads_done") == 3.0
    assert S.metric_value(m, "vllm:kvconnect_total", stat="nixl.loads_failed") == 0.0
    assert S.metric_value(m, "vllm:prefix_cache_hits") == 64.0


def test_a_missing_metric_is_an_error_naming_it_not_a_zero():
    m = S.parse_prometheus(_METRICS_TEXT)
    with pytest.raises(S.MetricMissing, match="vllm:external_prefix_cache_hits"):
        S.metric_value(m, "vllm:external_prefix_cache_hits")


def test_a_renamed_label_value_is_an_error_naming_the_labels():
    m = S.parse_prometheus(_METRICS_TEXT)
    with pytest.raises(S.MetricMissing, match="nixl.loads_fail") as e:
        S.metric_value(m, "vllm:kvconnect", stat="nixl.loads_fail")
    assert "other labels" in str(e.value)
