"""Reading a server's Prometheus ``/metrics`` in tests: parsed by prometheus_client's own text
parser into ``{(sample_name, sorted_label_items): value}``.

:func:`metric_value` RAISES :class:`MetricMissing` when no sample of the metric with those labels
exists, so a check such as ``== 0`` cannot pass on a metric that was renamed, never declared, or
asked of the wrong server. Counters are exposed as ``<name>_total`` and may be asked for in either
spelling; a histogram is read through its ``_sum``, ``_count`` or ``_bucket`` (with ``le``) samples.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvconnect.errors import KVConnectError
from kvconnect.testing.client import http_get

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


class MetricsFormatError(KVConnectError, ValueError):
    """A ``/metrics`` answer is not valid Prometheus text; the message names the server."""


class MetricMissing(KVConnectError, KeyError):
    """The server exposes no sample of that metric with those labels (renamed, never declared, or
    the wrong server): an error, so that a check such as ``== 0`` cannot pass on a metric that is
    not there."""


def parse_prometheus(text: str) -> Metrics:
    """Every sample of a Prometheus text exposition, keyed by sample name (``x_total``,
    ``h_bucket``, ...) and its sorted labels. Raises ``ValueError`` on text that is not the format."""
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def get_metrics(base_url: str, timeout: float = 10.0) -> Metrics:
    """Fetch and parse ``<base_url>/metrics``."""
    url = base_url.rstrip("/") + "/metrics"
    text = http_get(url, timeout=timeout)
    try:
        return parse_prometheus(text)
    except ValueError as e:
        raise MetricsFormatError(f"{url} is not Prometheus text: {e}") from e


def _base(name: str) -> str:
    for suffix in ("_total", *_HISTOGRAM_PARTS):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def metric_value(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of all samples called ``name`` whose labels include ``labels`` (e.g. over engines).
    Counters: pass ``x`` or ``x_total``. Histograms: ``x_sum``, ``x_count``, or ``x_bucket`` with
    ``le``. Raises :class:`MetricMissing` naming the metric and labels when there is no such sample."""
    names = {name} if name.endswith("_total") else {name, name + "_total"}
    want = set(labels.items())
    if name.endswith("_bucket") and "le" not in labels:
        # Buckets are cumulative: a sum over all ``le`` means nothing.
        raise MetricMissing(f"{name!r}: name the bucket with le=... (e.g. le='+Inf')")
    found = [v for (n, lab), v in metrics.items() if n in names and want <= set(lab)]
    if found:
        return sum(found)
    present = {n for (n, _) in metrics}
    if name + "_count" in present or name + "_bucket" in present:
        raise MetricMissing(f"{name!r} is a histogram or summary: read {name}_sum, {name}_count "
                            f"or {name}_bucket with le=...")
    near = sorted(n for n in present if _base(n) == _base(name))
    raise MetricMissing(f"no sample of {name!r} with labels {labels or '{}'} on this server"
                        + (f" (samples of {near} exist with other labels)" if near else ""))


#: vLLM's metrics that read 0 on a server holding no request and no KV block.
LEFT_METRICS = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")


def left_on_server(url: str) -> dict[str, float]:
    """What a vLLM server still holds: each of :data:`LEFT_METRICS` (all 0 once it is idle)."""
    m = get_metrics(url)
    return {k: metric_value(m, f"vllm:{k}") for k in LEFT_METRICS}
