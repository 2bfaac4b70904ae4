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


def test_left_on_server_reads_what_a_server_still_holds_and_refuses_a_missing_metric():
    import http.server
    import threading

    body = {"text": ""}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = body["text"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer((S.HOST, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://{S.HOST}:{srv.server_address[1]}"
    try:
        body["text"] = ('vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:num_requests_running{engine="0"} 1.0\n'
                        'vllm:num_requests_waiting{engine="0"} 0.0\n')
        assert S.left_on_server(url) == {"kv_cache_usage_perc": 0.25, "num_requests_running": 1.0,
                                         "num_requests_waiting": 0.0}
        body["text"] = 'vllm:kv_cache_usage_perc{engine="0"} 0.0\n'
        with pytest.raises(S.MetricMissing, match="num_requests_running"):
            S.left_on_server(url)
    finally:
        srv.shutdown()
