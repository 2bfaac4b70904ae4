"""kvconnect's statistics in vLLM's ``KVConnectorStats`` shape, and on vLLM's ``/metrics``.

Workers report per backend (:mod:`kvconnect.telemetry`: counters, a ``[seconds, bytes]`` sample
per transfer, gauges); the adapter's scheduler half adds each tier's gauges and the engine's load
wait. vLLM sums the stats over workers and steps, logs them in its periodic "KV Transfer metrics"
line and hands each step's to :class:`KVConnectPromMetrics`. On ``/metrics`` (labels: vLLM's
``model_name`` and ``engine``, plus bounded ones: backend and stat names are declared per backend,
directions are ``load`` / ``store``)::

    vllm:kvconnect_total{stat="nixl.bytes_received"}                      counters, as before
    vllm:kvconnect_transfer_seconds{backend="cpu_offload",direction="load"}  histogram per transfer
    vllm:kvconnect_transfer_bytes{backend="cpu_offload",direction="load"}    histogram per transfer
    vllm:kvconnect_load_wait_seconds          engine's wait for an async load (alloc -> received)
    vllm:kvconnect_tier_held_blocks{backend="cpu_offload"}  (also _held_bytes, _capacity_blocks)

Every declared name exists from the start, at zero.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from kvconnect.telemetry import GAUGES, TRANSFERS, StatNames, merge_stats

logger = logging.getLogger(__name__)

#: The adapter's own section of the stats (not a backend): ``{"load_wait": [seconds, ...]}``.
ENGINE = "_engine"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """Counters as ``backend.counter``; sample lists as their length (for the log line)."""
    out: dict[str, int | float] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = len(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _counters(section: Mapping[str, Any], prefix: str) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for k, v in section.items():
        if k in (TRANSFERS, GAUGES):
            continue
        if isinstance(v, Mapping):
            out.update(_counters(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class KVConnectStats(KVConnectorStats):
    """Stats summed across workers and steps; reduced to flat ``backend.counter`` numbers."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectStats:
        merge_stats(self.data, other.data or {})
        return self

    def reduce(self) -> dict[str, int | float]:
        return _flatten(self.data)

    def is_empty(self) -> bool:
        return not self.data


#: Name of the counter family on ``/metrics`` (Prometheus adds ``_total``).
PROM_COUNTER = "vllm:kvconnect"
PROM_SECONDS = "vllm:kvconnect_transfer_seconds"
PROM_BYTES = "vllm:kvconnect_transfer_bytes"
PROM_LOAD_WAIT = "vllm:kvconnect_load_wait_seconds"
#: Gauge families are ``vllm:kvconnect_tier_<gauge>`` (``held_blocks``, ``held_bytes``, ...).
PROM_TIER = "vllm:kvconnect_tier_"
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: 4 KiB to 16 GiB, by 4x.
BYTES_BUCKETS = tuple(float(4**i) for i in range(6, 18))


def declared_stats(extra_config: Mapping[str, Any] | None) -> dict[str, StatNames]:
    """backend name -> the stats it declares, for the backends a kv-transfer config names."""
    from kvconnect.config import parse_config
    from kvconnect.registry import stat_names

    out: dict[str, StatNames] = {}
    for name in parse_config(extra_config).names:
        try:
            out[name] = stat_names(name)
        except KeyError:
            logger.warning(
                "kvconnect: backend %s declares no stats; its metrics appear when first reported", name
            )
    return out


class KVConnectPromMetrics(KVConnectorPromMetrics):
    """kvconnect's counters, histograms and gauges on vLLM's ``/metrics`` (see the module doc)."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        labels = list(labelnames)
        self._counter = self._counter_cls(
            name=PROM_COUNTER,
            documentation="kvconnect transfer counters by backend and stat (bytes, seconds or counts "
            "as the stat name says), summed over workers",
            labelnames=labels + ["stat"],
        )
        self._seconds = self._histogram_cls(
            name=PROM_SECONDS, documentation="kvconnect: duration of one transfer (a request's load or "
            "store), by backend and direction", buckets=list(SECONDS_BUCKETS),
            labelnames=labels + ["backend", "direction"],
        )
        self._bytes = self._histogram_cls(
            name=PROM_BYTES, documentation="kvconnect: bytes of one transfer, by backend and direction",
            buckets=list(BYTES_BUCKETS), labelnames=labels + ["backend", "direction"],
        )
        self._wait = self._histogram_cls(
            name=PROM_LOAD_WAIT, documentation="kvconnect: how long the engine waited for an asynchronous "
            "KV load, from allocation to the load reported finished", buckets=list(SECONDS_BUCKETS),
            labelnames=labels,
        )
        self._gauge_families: dict[str, Any] = {}
        self._children: dict[tuple, Any] = {}
        ktc = getattr(vllm_config, "kv_transfer_config", None)
        declared = declared_stats(getattr(ktc, "kv_connector_extra_config", None)) if ktc is not None else {}
        for engine_idx in per_engine_labelvalues:
            self._child("wait", engine_idx)
            for backend, names in declared.items():
                for c in names.counters:
                    self._child("counter", engine_idx, f"{backend}.{c}")
                for d in names.transfers:
                    self._child("seconds", engine_idx, backend, d)
                    self._child("bytes", engine_idx, backend, d)
                for g in names.gauges:
                    self._child("gauge", engine_idx, g, backend)

    def _gauge_family(self, gauge: str) -> Any:
        fam = self._gauge_families.get(gauge)
        if fam is None:
            fam = self._gauge_families[gauge] = self._gauge_cls(
                name=PROM_TIER + gauge,
                documentation=f"kvconnect: {gauge.replace('_', ' ')} of a storage tier, by backend",
                multiprocess_mode="mostrecent",
                labelnames=list(self._labelnames) + ["backend"],
            )
        return fam

    def _child(self, kind: str, engine_idx: int, *extra: str) -> Any:
        key = (kind, engine_idx, *extra)
        child = self._children.get(key)
        if child is None:
            values = list(self.per_engine_labelvalues.get(engine_idx, []))
            if kind == "counter":
                child = self._counter.labels(*values, *extra)
            elif kind == "seconds":
                child = self._seconds.labels(*values, *extra)
            elif kind == "bytes":
                child = self._bytes.labels(*values, *extra)
            elif kind == "wait":
                child = self._wait.labels(*values)
            else:  # gauge: extra = (gauge name, backend)
                child = self._gauge_family(extra[0]).labels(*values, extra[1])
            self._children[key] = child
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for backend, section in (transfer_stats_data or {}).items():
            if not isinstance(section, Mapping):
                continue
            if backend == ENGINE:
                for s in section.get("load_wait", ()):
                    self._child("wait", engine_idx).observe(s)
                continue
            for stat, value in _counters(section, f"{backend}.").items():
                if value > 0:  # counters only go up; nothing to add
                    self._child("counter", engine_idx, stat).inc(value)
            for direction, samples in (section.get(TRANSFERS) or {}).items():
                secs = self._child("seconds", engine_idx, backend, direction)
                size = self._child("bytes", engine_idx, backend, direction)
                for s, n in samples:
                    secs.observe(s)
                    size.observe(n)
            for gauge, value in (section.get(GAUGES) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._child("gauge", engine_idx, gauge, backend).set(value)
