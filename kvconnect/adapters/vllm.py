"""kvconnect as a vLLM (0.32+) KV connector.

Select it with ``--kv-transfer-config '{"kv_connector": "KVConnect", "kv_role": "kv_both",
"kv_connector_extra_config": {...kvconnect config...}}'`` (the name is registered by kvconnect's
``vllm.general_plugins`` entry point), or with ``"kv_connector_module_path":
"kvconnect.adapters.vllm"``.

This class only translates between vLLM's objects and kvconnect's neutral API
(:mod:`kvconnect.api`); every decision about what to load, store or transfer is a backend's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvconnect.adapters import vllm_translate as tr
from kvconnect.adapters.vllm_events import to_vllm_events
from kvconnect.adapters.vllm_stats import ENGINE, KVConnectPromMetrics, KVConnectStats
from kvconnect.api import StepView, TransferResults
from kvconnect.config import parse_config
from kvconnect.errors import ConfigError
from kvconnect.registry import create_scheduler, create_worker
from kvconnect.telemetry import GAUGES, merge_stats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)
_NONE: frozenset = frozenset()
#: What a backend that never reads the step (``SchedulerConnector.reads_step``) is passed.
_NO_STEP = StepView()


class KVConnectMetadata(KVConnectorMetadata):
    """The backend's step metadata, carried from the scheduler to the workers."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload


class KVConnectHandshake(KVConnectorHandshakeMetadata):
    def __init__(self, payload: Any) -> None:
        self.payload = payload


class KVConnectWorkerMeta(KVConnectorWorkerMetadata):
    """What vLLM's connector output has no field for: sends/stores that failed."""

    def __init__(self, failed_sending: set[str]) -> None:
        self.failed_sending = failed_sending

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectWorkerMeta:
        return KVConnectWorkerMeta(self.failed_sending | getattr(other, "failed_sending", set()))


class KVConnect(KVConnectorBase_V1, SupportsHMA):
    """vLLM's view of a kvconnect connector (one backend, or several composed)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self._config = parse_config(ktc.kv_connector_extra_config)
        tp_rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        self._engine = tr.engine_info(vllm_config, kv_cache_config, tp_rank)
        self._num_groups = len(kv_cache_config.kv_cache_groups)
        self._groups = tr.layer_group_index(kv_cache_config.kv_cache_groups)
        self._kv_layout_hint = getattr(kv_cache_config, "kv_cache_layout", None)
        self._sched = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = create_scheduler(self._config, self._engine)
            supports_hybrid = self._sched.supports_hybrid
        else:
            self._worker = create_worker(self._config, self._engine)
            supports_hybrid = self._worker.supports_hybrid
        if self._num_groups > 1 and not supports_hybrid:
            raise ConfigError(
                f"this model has {self._num_groups} KV-cache groups (hybrid attention) but the "
                f"configured backends {self._config.names} do not all support hybrid models; "
                "start vLLM with --disable-hybrid-kv-cache-manager"
            )
        self._load_key = self._sched.loads_only_when if self._sched is not None else None
        self._reads_step = self._sched.reads_step if self._sched is not None else True
        #: the backend's shared "nothing to send" payload, wrapped once (most steps send nothing)
        empty = self._sched.empty_step_metadata if self._sched is not None else None
        self._empty_meta = KVConnectMetadata(empty) if empty is not None else None
        self._load_errors: set[int] = set()
        self._failed_sending: set[str] = set()
        self._stats: dict[str, Any] | None = None
        #: scheduler half: when each async load was handed out (the engine's load wait), the
        #: waits measured since the stats were last taken, and the gauges last reported
        self._load_t0: dict[str, float] = {}
        self._load_waits: list[float] = []
        self._gauges_sent: dict[str, Any] = {}
        logger.info("kvconnect %s half ready: backends %s", role.name.lower(), self._config.names)

    # -- worker half -----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        described = {}
        for name, tensor in kv_caches.items():
            group, spec = self._groups.get(name, (0, None))
            if spec is None:
                raise ConfigError(f"vLLM registered KV layer {name!r} that no KV-cache group names")
            for entry, view, lay in tr.layer_entries(name, tensor, spec, group, self._kv_layout_hint):
                described[entry] = (view, lay)
        self._worker.register_kv_caches(described)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._worker.bind_step_metadata(connector_metadata.payload)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._worker.clear_step_metadata()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        self._worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self._worker.wait_for_save()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        r = self._worker.get_transfer_results(finished_req_ids)
        # vLLM maps block-level errors back to requests only for single-group models; with
        # several groups a failed request (failed_recving) is how it learns to recompute.
        if self._num_groups == 1:
            self._load_errors |= r.invalid_block_ids
        if r.stats:
            # Keyed by backend name also for one backend (a composition keys them already), and
            # merged: vLLM may drain results more than once before it asks for the stats.
            stats = r.stats if len(self._config.names) > 1 else {self._config.names[0]: r.stats}
            if self._stats is None:
                self._stats = {}
            merge_stats(self._stats, stats)
        self._failed_sending |= r.failed_sending
        return KVConnectorTransferResults(
            finished_sending=set(r.finished_sending),
            finished_recving=set(r.finished_recving) | set(r.failed_recving),
            failed_recving=set(r.failed_recving),
        )

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def build_connector_worker_meta(self) -> KVConnectWorkerMeta | None:
        if not self._failed_sending:
            return None
        out, self._failed_sending = self._failed_sending, set()
        return KVConnectWorkerMeta(out)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def get_kv_connector_stats(self) -> KVConnectStats | None:
        if self._sched is not None:
            self._scheduler_stats()
        data, self._stats = self._stats, None
        return KVConnectStats(data=data) if data else None

    def _scheduler_stats(self) -> None:
        """The scheduler half's part: the engine's load waits, and tier gauges that changed."""
        out: dict[str, Any] = {}
        if self._load_waits:
            out[ENGINE] = {"load_wait": self._load_waits}
            self._load_waits = []
        gauges = self._sched.get_gauges()
        if gauges and len(self._config.names) == 1:
            gauges = {self._config.names[0]: gauges}
        for backend, g in gauges.items():
            if g and self._gauges_sent.get(backend) != g:
                self._gauges_sent[backend] = g
                out[backend] = {GAUGES: dict(g)}
        if out:
            if self._stats is None:
                self._stats = {}
            merge_stats(self._stats, out)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectStats | None:
        return KVConnectStats(data=data) if data is not None else KVConnectStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectPromMetrics:
        return KVConnectPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_handshake_metadata(self) -> KVConnectHandshake | None:
        if self._worker is None:
            return None
        md = self._worker.get_handshake_metadata()
        return KVConnectHandshake(md) if md is not None else None

    # -- scheduler half ------------------------------------------------------------------------
    # A request the backends never load for (a P/D producer's, see
    # ``SchedulerConnector.loads_only_when``) skips them in the lookup and the allocation notice.
    # The check is written out in both: they run for every request, and a helper call would cost
    # as much as the check.
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        key = self._load_key
        if key is not None:
            params = request.kv_transfer_params
            if not params or not params.get(key):
                return 0, False
        return self._sched.get_num_new_matched_tokens(tr.VllmRequestView(request, False), num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        if num_external_tokens <= 0:
            return {}
        src = self._sched.hit_source_of(request.request_id)
        try:
            source = CacheHitSource(src) if src else CacheHitSource.EXTERNAL_UNSPECIFIED
        except ValueError:
            source = CacheHitSource.EXTERNAL_UNSPECIFIED
        return {source: num_external_tokens}

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int) -> None:
        key = self._load_key
        if key is not None:
            params = request.kv_transfer_params
            if not params or not params.get(key):
                return
        # Every backend reads the block ids of an external load; other notices read them from
        # vLLM's block objects only if the backend looks at them (most never do).
        if num_external_tokens > 0:
            self._load_t0[request.request_id] = time.monotonic()
            ids = tr.block_ids_of(blocks)
        else:
            ids = tr.LazyBlockIds(blocks)
        self._sched.update_state_after_alloc(tr.VllmRequestView(request, False), ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        step = tr.step_view(scheduler_output) if self._reads_step else _NO_STEP
        payload = self._sched.build_step_metadata(step)
        empty = self._empty_meta
        if empty is not None and payload is empty.payload:
            return empty
        # Not kept here: the engine drops it with its step output (the block-id lists it holds
        # are freed there, not in the next step's call).
        return KVConnectMetadata(payload)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        o = connector_output
        failed_recving = o.failed_recving
        failed_sending = getattr(o.kv_connector_worker_meta, "failed_sending", None)
        if not (o.finished_sending or o.finished_recving or failed_recving or o.invalid_block_ids
                or failed_sending):
            return  # most steps: nothing to tell the backend
        if o.finished_recving and self._load_t0:
            now = time.monotonic()
            for rid in o.finished_recving:
                t0 = self._load_t0.pop(rid, None)
                if t0 is not None:
                    self._load_waits.append(now - t0)
        # vLLM's sets, not copies: backends only read results (see TransferResults).
        self._sched.update_worker_output(
            TransferResults(
                finished_sending=o.finished_sending or _NONE,
                finished_recving=o.finished_recving or _NONE,
                failed_recving=failed_recving or _NONE,
                invalid_block_ids=o.invalid_block_ids or _NONE,
                failed_sending=failed_sending or _NONE,
            )
        )

    # vLLM builds the block-id lists it passes to request_finished* for that call alone, and
    # backends copy what they keep: they are passed on without another copy.
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._load_t0:
            self._load_t0.pop(request.request_id, None)
        return self._sched.request_finished(tr.VllmRequestView(request), (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._load_t0:
            self._load_t0.pop(request.request_id, None)
        groups = block_ids if isinstance(block_ids, tuple) else tr.block_ids_of(block_ids)
        return self._sched.request_finished(tr.VllmRequestView(request), groups)

    def take_events(self) -> Iterable[KVCacheEvent]:
        if self._sched is None:
            return ()
        events = self._sched.take_events()
        return to_vllm_events(events) if events else ()

    def has_pending_push_work(self) -> bool:
        return self._sched is not None and self._sched.has_pending_work()

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if self._sched is not None:
            self._sched.set_handshake_metadata(
                {rank: getattr(m, "payload", m) for rank, m in metadata.items()}
            )

    def shutdown(self) -> None:
        for half in (self._sched, self._worker):
            if half is not None:
                half.shutdown()
