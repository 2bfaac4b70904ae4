"""kvconnect's statistics in vLLM's ``KVConnectorStats`` shape, so they reach vLLM's metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

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
