"""Reading /metrics in tests: prometheus_client's parser underneath, and a metric or label set that
is not there is an error naming it, never a 0."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from kvconnect.testing import metrics as M
from kvconnect.testing.procs import HOST

pytestmark = pytest.mark.unit

# As vLLM's prometheus_client writes it: a counter family with _total and _created samples, a
# histogram, gauges, and a label value with an escaped quote, backslash and newline.
_METRICS_TEXT = r"""# HELP vllm:kvconnect_total kvconnect transfer counters
# TYPE vllm:kvconnect_total counter
vllm:kvconnect_total{engine="0",model_name="tiny",stat="nixl.loads_done"} 3.0
vllm:kvconnect_total{engine="1",model_name="tiny",stat="nixl.loads_done"} 2.0
vllm:kvconnect_total{engine="0",model_name="tiny",stat="nixl.loads_failed"} 0.0
# HELP vllm:kvconnect_created kvconnect transfer counters
# TYPE vllm:kvconnect_created gauge
vllm:kvconnect_created{engine="0",model_name="tiny",stat="nixl.loads_done"} 1.7e+09
# HELP vllm:prefix_cache_hits_total hits
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 64.0
# HELP vllm:e2e_request_latency_seconds latency
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.5",model_name="tiny"} 1.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 4.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="tiny"} 4.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="tiny"} 6.5
# HELP vllm:lora_requests_info info
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{running_lora_adapters="a\"b\\c\nd",waiting_lora_adapters=""} 1.0
"""


def test_a_counter_is_read_in_either_spelling_and_summed_over_engines():
    m = M.parse_prometheus(_METRICS_TEXT)
    assert M.metric_value(m, "vllm:kvconnect", stat="nixl.loads_done") == 5.0
    assert M.metric_value(m, "vllm:kvconnect_total", stat="nixl.loads_done", engine="1") == 2.0
    assert M.metric_value(m, "vllm:kvconnect_total", stat="nixl.loads_failed") == 0.0
    assert M.metric_value(m, "vllm:prefix_cache_hits") == 64.0


def test_label_values_with_escaped_quotes_backslashes_and_newlines_are_unescaped():
    m = M.parse_prometheus(_METRICS_TEXT)
    assert M.metric_value(m, "vllm:lora_requests_info", running_lora_adapters='a"b\\c\nd') == 1.0
    with pytest.raises(M.MetricMissing):
        M.metric_value(m, "vllm:lora_requests_info", running_lora_adapters='a\\"b')


def test_a_histogram_is_read_through_its_sum_count_and_named_bucket():
    m = M.parse_prometheus(_METRICS_TEXT)
    name = "vllm:e2e_request_latency_seconds"
    assert M.metric_value(m, name + "_sum") == 6.5
    assert M.metric_value(m, name + "_count") == 4.0
    assert M.metric_value(m, name + "_bucket", le="0.5") == 1.0
    assert M.metric_value(m, name + "_bucket", le="+Inf") == 4.0
    with pytest.raises(M.MetricMissing, match="histogram"):
        M.metric_value(m, name)
    with pytest.raises(M.MetricMissing, match="le="):
        M.metric_value(m, name + "_bucket")  # cumulative buckets summed would mean nothing


def test_a_missing_metric_is_an_error_naming_it_not_a_zero():
    m = M.parse_prometheus(_METRICS_TEXT)
    with pytest.raises(M.MetricMissing, match="vllm:external_prefix_cache_hits"):
        M.metric_value(m, "vllm:external_prefix_cache_hits")


def test_a_renamed_label_value_is_an_error_naming_the_labels():
    m = M.parse_prometheus(_METRICS_TEXT)
    with pytest.raises(M.MetricMissing, match="nixl.loads_fail") as e:
        M.metric_value(m, "vllm:kvconnect", stat="nixl.loads_fail")
    assert "other labels" in str(e.value)


def test_text_that_is_not_the_format_is_refused():
    with pytest.raises(ValueError):
        M.parse_prometheus('vllm:x{engine="0" 1.0\n')


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A local HTTP server answering every GET with ``body["text"]``."""
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

    srv = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://{HOST}:{srv.server_address[1]}", body
    finally:
        srv.shutdown()
        srv.server_close()


def test_get_metrics_reads_a_servers_endpoint_and_names_it_when_garbled(metrics_server):
    url, body = metrics_server
    body["text"] = _METRICS_TEXT
    m = M.get_metrics(url)
    assert M.metric_value(m, "vllm:kvconnect", stat="nixl.loads_done", engine="0") == 3.0
    body["text"] = "vllm:x{engine=0} 1\n"
    with pytest.raises(M.MetricsFormatError, match=url + "/metrics"):
        M.get_metrics(url)


def test_left_on_server_reads_what_a_server_still_holds_and_refuses_a_missing_metric(metrics_server):
    url, body = metrics_server
    body["text"] = ('vllm:kv_cache_usage_perc{engine="0"} 0.25\nvllm:num_requests_running{engine="0"} 1.0\n'
                    'vllm:num_requests_waiting{engine="0"} 0.0\n')
    assert M.left_on_server(url) == {"kv_cache_usage_perc": 0.25, "num_requests_running": 1.0,
                                     "num_requests_waiting": 0.0}
    body["text"] = 'vllm:kv_cache_usage_perc{engine="0"} 0.0\n'
    with pytest.raises(M.MetricMissing, match="num_requests_running"):
        M.left_on_server(url)
