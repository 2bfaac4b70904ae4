"""``kvconnect top``: parsing /metrics text, quantiles from histogram buckets, the rendered view."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kvconnect.top import Hist, failures, main, parse, render

pytestmark = pytest.mark.unit

L = 'engine="0",model_name="tiny"'


def metrics_text(loads: int, load_le: dict[str, int], stores: int = 1, load_fail: int = 0) -> str:
    """/metrics as a vLLM server with kvconnect (cpu_offload) prints it."""
    buckets = "".join(
        f'vllm:kvconnect_transfer_seconds_bucket{{backend="cpu_offload",direction="load",{L},le="{le}"}} '
        f'{c}.0\n'
        for le, c in load_le.items()
    )
    load_inf = (
        f'vllm:kvconnect_transfer_seconds_bucket{{backend="cpu_offload",direction="load",{L},le="+Inf"}} '
        f"{loads}.0"
    )
    return f"""# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{{L}}} 640.0
# HELP vllm:external_prefix_cache_hits_total External prefix cache hits from KV connector.
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{{{L}}} 384.0
# HELP vllm:prompt_tokens_cached_by_source_total Prefix-cache hit tokens by the cache tier that supplied them
# TYPE vllm:prompt_tokens_cached_by_source_total counter
vllm:prompt_tokens_cached_by_source_total{{{L},source="device"}} 640.0
vllm:prompt_tokens_cached_by_source_total{{{L},source="host"}} 384.0
vllm:prompt_tokens_cached_by_source_total{{{L},source="p2p"}} 0.0
# HELP vllm:kvconnect_total kvconnect transfer counters
# TYPE vllm:kvconnect_total counter
vllm:kvconnect_total{{{L},stat="cpu_offload.load_blocks"}} {loads * 6}.0
vllm:kvconnect_total{{{L},stat="cpu_offload.load_failures"}} {load_fail}.0
vllm:kvconnect_total{{{L},stat="cpu_offload.key_mismatches"}} 1.0
vllm:kvconnect_total{{{L},stat="cpu_offload.store_blocks"}} 18.0
# HELP vllm:kvconnect_transfer_seconds kvconnect: duration of one transfer
# TYPE vllm:kvconnect_transfer_seconds histogram
{buckets}{load_inf}
vllm:kvconnect_transfer_seconds_count{{backend="cpu_offload",direction="load",{L}}} {loads}.0
vllm:kvconnect_transfer_seconds_sum{{backend="cpu_offload",direction="load",{L}}} 0.05
vllm:kvconnect_transfer_seconds_bucket{{backend="cpu_offload",direction="store",{L},le="0.01"}} {stores}.0
vllm:kvconnect_transfer_seconds_bucket{{backend="cpu_offload",direction="store",{L},le="+Inf"}} {stores}.0
vllm:kvconnect_transfer_seconds_count{{backend="cpu_offload",direction="store",{L}}} {stores}.0
vllm:kvconnect_transfer_seconds_sum{{backend="cpu_offload",direction="store",{L}}} 0.004
# HELP vllm:kvconnect_transfer_bytes kvconnect: bytes of one transfer
# TYPE vllm:kvconnect_transfer_bytes histogram
vllm:kvconnect_transfer_bytes_bucket{{backend="cpu_offload",direction="load",{L},le="+Inf"}} {loads}.0
vllm:kvconnect_transfer_bytes_count{{backend="cpu_offload",direction="load",{L}}} {loads}.0
vllm:kvconnect_transfer_bytes_sum{{backend="cpu_offload",direction="load",{L}}} {loads * 393216}.0
# HELP vllm:kvconnect_tier_held_blocks kvconnect: held blocks of a storage tier, by backend
# TYPE vllm:kvconnect_tier_held_blocks gauge
vllm:kvconnect_tier_held_blocks{{backend="cpu_offload",{L}}} 12.0
# HELP vllm:kvconnect_tier_capacity_blocks kvconnect: capacity blocks of a storage tier, by backend
# TYPE vllm:kvconnect_tier_capacity_blocks gauge
vllm:kvconnect_tier_capacity_blocks{{backend="cpu_offload",{L}}} 12.0
"""


def test_parse_reads_counters_histograms_gauges_and_hits():
    s = parse(metrics_text(4, {"0.001": 1, "0.01": 3, "0.1": 4}), t=0.0)
    assert s.counters["cpu_offload.load_blocks"] == 24
    h = s.seconds[("cpu_offload", "load")]
    assert (h.count, h.sum) == (4, 0.05) and h.buckets[0.01] == 3 and h.buckets[float("inf")] == 4
    assert s.nbytes[("cpu_offload", "load")] == 4 * 393216
    assert s.gauges[("cpu_offload", "held_blocks")] == 12
    assert s.hits == {"device": 640, "host": 384, "p2p": 0}
    assert failures(s) == {"cpu_offload": {"load_failures": 0, "key_mismatches": 1}}


def test_without_hits_by_source_the_device_and_external_counters_are_shown():
    text = "\n".join(ln for ln in metrics_text(1, {}).splitlines() if "by_source" not in ln) + "\n"
    assert parse(text).hits == {"device": 640, "external": 384}


def test_quantiles_interpolate_within_the_bucket_like_prometheus():
    h = Hist({0.001: 1, 0.01: 3, 0.1: 4, float("inf"): 4}, 4, 0.05)
    assert h.quantile(0.5) == pytest.approx(0.001 + (0.01 - 0.001) * 0.5)  # rank 2: halfway into (1, 3]
    assert h.quantile(0.99) == pytest.approx(0.01 + (0.1 - 0.01) * 0.96)
    assert Hist({0.1: 0, float("inf"): 2}, 2, 5.0).quantile(0.5) == 0.1  # beyond the last bound
    assert Hist().quantile(0.5) is None


def test_view_shows_transfers_rates_and_percentiles_of_the_last_interval():
    old = parse(metrics_text(2, {"0.001": 2, "0.01": 2, "0.1": 2}), t=10.0)
    cur = parse(metrics_text(6, {"0.001": 2, "0.01": 2, "0.1": 6}), t=12.0, )
    out = render({"http://s1": cur}, {"http://s1": old})
    row = next(ln for ln in out.splitlines() if "cpu_offload" in ln and " load " in ln)
    cols = row.split()
    assert cols[2:4] == ["6", "2.0"]  # 6 loads in all, (6 - 2) / 2 s
    # the 4 new loads all fell in (0.01, 0.1]: P50 is inside that bucket, not the old fast ones
    assert 10.0 < float(cols[4]) < 100.0
    assert "cpu_offload holds 12/12 blocks" in out
    assert "other failures: cpu_offload.key_mismatches 1" in out
    assert "device 640  host 384" in out and "p2p" not in out  # tiers that served nothing are left out


def test_failures_are_shown_on_their_directions_row():
    out = render({"s": parse(metrics_text(4, {"0.01": 4}, load_fail=2), t=0.0)})
    rows = {tuple(ln.split()[:2]): ln.split() for ln in out.splitlines() if ln.strip()}
    assert rows[("cpu_offload", "load")][-1] == "2" and rows[("cpu_offload", "store")][-1] == "0"


def test_once_prints_one_snapshot_and_fails_for_an_unreachable_server(capsys):
    body = metrics_text(3, {"0.01": 3}).encode()

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        assert main(["--once", url]) == 0
        out = capsys.readouterr().out
        row = next(ln for ln in out.splitlines() if "cpu_offload" in ln and " load " in ln)
        assert row.split()[2:4] == ["3", "-"]  # no rate from one snapshot
        srv.shutdown()
        assert main(["--once", "--timeout", "1", url]) == 1
        assert "unreachable" in capsys.readouterr().out
    finally:
        srv.server_close()
