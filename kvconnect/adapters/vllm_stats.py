"""kvconnect's statistics in vLLM's ``KVConnectorStats`` shape, so they reach vLLM's metrics.

Workers report counters per backend (``{"nixl": {"loads_done": 1, "bytes_received": 65536, ...}}``);
vLLM sums them over workers and steps, logs them with its periodic "KV Transfer metrics" line and
hands them to :class:`KVConnectPromMetrics`, which adds them to one Prometheus counter family on
the server's ``/metrics``::

    vllm:kvconnect_total{engine="0",model_name="...",stat="nixl.bytes_received"} 65536.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvconnect.aggregator import _merge_stats


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


@dataclass
class KVConnectStats(KVConnectorStats):
    """Counters summed across workers and steps; reduced to flat ``backend.counter`` numbers."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectStats:
        _merge_stats(self.data, other.data or {})
        return self

    def reduce(self) -> dict[str, int | float]:
        return _flatten(self.data)

    def is_empty(self) -> bool:
        return not self.data


#: Name of the counter family on ``/metrics`` (Prometheus adds ``_total``).
PROM_COUNTER = "vllm:kvconnect"


class KVConnectPromMetrics(KVConnectorPromMetrics):
    """Every kvconnect counter as ``vllm:kvconnect_total{stat="<backend>.<counter>"}``: one family
    with a ``stat`` label, since which counters exist depends on the configured backends."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counter = self._counter_cls(
            name=PROM_COUNTER,
            documentation="kvconnect transfer counters by backend and stat (bytes, seconds or counts "
            "as the stat name says), summed over workers",
            labelnames=list(labelnames) + ["stat"],
        )
        self._children: dict[tuple[int, str], Any] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for stat, value in _flatten(transfer_stats_data or {}).items():
            if value <= 0:  # counters only go up; nothing to add
                continue
            child = self._children.get((engine_idx, stat))
            if child is None:
                values = list(self.per_engine_labelvalues.get(engine_idx, []))
                child = self._children[(engine_idx, stat)] = self._counter.labels(*values, stat)
            child.inc(value)
