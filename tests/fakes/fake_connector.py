"""A scripted connector pair (scheduler half + worker half) that records every call.

Used to test compositions (the MultiConnector) without a real backend. Every behaviour is set by
plain attributes that a test may change between calls:

* scheduler: ``hits`` (request id -> tokens, or None for "ask again later"; ``default_hit``
  otherwise), ``is_async``, ``params`` (request id -> transfer params), ``defer`` (request ids
  whose blocks to keep), ``stats``, ``hybrid``;
* worker: ``queue_sent`` / ``queue_recved`` / ``queue_stats`` script what the next
  ``get_transfer_results`` returns; ``handshake`` is what ``get_handshake_metadata`` returns;
* both: ``raise_in`` — names of methods that raise :class:`ScriptedFailure`.

``calls`` lists ``(method, args...)`` in call order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from kvconnect.api import (
    BlockIds,
    EngineInfo,
    RequestView,
    SchedulerConnector,
    StepView,
    TransferResults,
    WorkerConnector,
)


class ScriptedFailure(RuntimeError):
    pass


class FakeStepMeta(msgspec.Struct, frozen=True, kw_only=True):
    child: str
    step: int
    scheduled: tuple[str, ...] = ()
    finished: tuple[str, ...] = ()


def _maybe_raise(obj: Any, method: str) -> None:
    if method in obj.raise_in:
        raise ScriptedFailure(f"{obj.name}: scripted failure in {method}")


class FakeScheduler(SchedulerConnector):
    def __init__(
        self,
        name: str = "fake",
        *,
        hits: Mapping[str, int | None] | None = None,
        default_hit: int | None = 0,
        is_async: bool = True,
        params: Mapping[str, dict[str, Any]] | None = None,
        defer: Iterable[str] = (),
        stats: Mapping[str, Any] | None = None,
        hybrid: bool = False,
        raise_in: Iterable[str] = (),
        engine: EngineInfo | None = None,
    ) -> None:
        self.name = name
        self.hits = dict(hits or {})
        self.default_hit = default_hit
        self.is_async = is_async
        self.params = dict(params or {})
        self.defer = set(defer)
        self.stats = dict(stats or {})
        self.supports_hybrid = hybrid
        self.raise_in = set(raise_in)
        self.engine = engine
        self.calls: list[tuple[Any, ...]] = []
        self._step = 0

    def calls_to(self, method: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == method]

    def get_num_new_matched_tokens(self, request: RequestView, num_computed_tokens: int):
        self.calls.append(("get_num_new_matched_tokens", request.request_id, num_computed_tokens))
        _maybe_raise(self, "get_num_new_matched_tokens")
        return self.hits.get(request.request_id, self.default_hit), self.is_async

    def update_state_after_alloc(self, request: RequestView, block_ids: BlockIds, num_external_tokens: int):
        self.calls.append(("update_state_after_alloc", request.request_id,
                           [list(g) for g in block_ids], num_external_tokens))
        _maybe_raise(self, "update_state_after_alloc")

    def build_step_metadata(self, step: StepView) -> FakeStepMeta:
        self.calls.append(("build_step_metadata", step))
        _maybe_raise(self, "build_step_metadata")
        self._step += 1
        return FakeStepMeta(
            child=self.name,
            step=self._step,
            scheduled=tuple(s.request_id for s in step.scheduled),
            finished=tuple(sorted(step.finished_request_ids)),
        )

    def request_finished(self, request: RequestView, block_ids: BlockIds):
        self.calls.append(("request_finished", request.request_id, [list(g) for g in block_ids]))
        _maybe_raise(self, "request_finished")
        p = self.params.get(request.request_id)
        return request.request_id in self.defer, (dict(p) if p is not None else None)

    def update_worker_output(self, results: TransferResults) -> None:
        self.calls.append(("update_worker_output", results))
        _maybe_raise(self, "update_worker_output")

    def set_handshake_metadata(self, metadata: Mapping[int, Any]) -> None:
        self.calls.append(("set_handshake_metadata", dict(metadata)))
        _maybe_raise(self, "set_handshake_metadata")

    def get_stats(self) -> dict[str, Any]:
        _maybe_raise(self, "get_stats")
        return dict(self.stats)

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        _maybe_raise(self, "shutdown")


class FakeWorker(WorkerConnector):
    def __init__(
        self,
        name: str = "fake",
        *,
        handshake: Any = None,
        hybrid: bool = False,
        raise_in: Iterable[str] = (),
        engine: EngineInfo | None = None,
    ) -> None:
        self.name = name
        self.handshake = handshake
        self.supports_hybrid = hybrid
        self.raise_in = set(raise_in)
        self.engine = engine
        self.calls: list[tuple[Any, ...]] = []
        self.bound: list[Any] = []
        self._next = TransferResults()

    def calls_to(self, method: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == method]

    # -- scripting ---------------------------------------------------------------------------

    def queue_sent(self, *request_ids: str, failed: bool = False) -> None:
        self._next.finished_sending.update(request_ids)
        if failed:
            self._next.failed_sending.update(request_ids)

    def queue_recved(self, *request_ids: str, failed: bool = False, invalid: Iterable[int] = ()) -> None:
        self._next.finished_recving.update(request_ids)
        if failed:
            self._next.failed_recving.update(request_ids)
        self._next.invalid_block_ids.update(invalid)

    def queue_stats(self, stats: dict[str, Any]) -> None:
        self._next.stats = dict(stats)

    # -- WorkerConnector ---------------------------------------------------------------------

    def register_kv_caches(self, caches) -> None:
        self.calls.append(("register_kv_caches", list(caches)))
        _maybe_raise(self, "register_kv_caches")

    def bind_step_metadata(self, metadata: Any) -> None:
        self.calls.append(("bind_step_metadata", metadata))
        _maybe_raise(self, "bind_step_metadata")
        self.bound.append(metadata)

    def clear_step_metadata(self) -> None:
        self.calls.append(("clear_step_metadata",))
        _maybe_raise(self, "clear_step_metadata")

    def start_load_kv(self) -> None:
        self.calls.append(("start_load_kv",))
        _maybe_raise(self, "start_load_kv")

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.calls.append(("wait_for_layer_load", layer_name))
        _maybe_raise(self, "wait_for_layer_load")

    def save_kv_layer(self, layer_name: str, kv_layer: Any) -> None:
        self.calls.append(("save_kv_layer", layer_name, kv_layer))
        _maybe_raise(self, "save_kv_layer")

    def wait_for_save(self) -> None:
        self.calls.append(("wait_for_save",))
        _maybe_raise(self, "wait_for_save")

    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults:
        self.calls.append(("get_transfer_results", set(finished_request_ids)))
        _maybe_raise(self, "get_transfer_results")
        out, self._next = self._next, TransferResults()
        return out

    def get_handshake_metadata(self) -> Any:
        _maybe_raise(self, "get_handshake_metadata")
        return self.handshake

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        _maybe_raise(self, "shutdown")


class FakePair:
    """A scheduler half and a worker half of one fake child, sharing a name."""

    def __init__(self, name: str, **scheduler_kw: Any) -> None:
        worker_kw = {k: scheduler_kw.pop(k) for k in ("handshake",) if k in scheduler_kw}
        hybrid = scheduler_kw.get("hybrid", False)
        self.name = name
        self.scheduler = FakeScheduler(name, **scheduler_kw)
        self.worker = FakeWorker(name, hybrid=hybrid, **worker_kw)


class ConfiguredFakeScheduler(FakeScheduler):
    """Built by the registry as ``cls(backend_config, engine)``; named after the backend."""

    def __init__(self, config: Any, engine: EngineInfo) -> None:
        from kvconnect.config import backend_name

        super().__init__(backend_name(config), engine=engine)
        self.config = config


class ConfiguredFakeWorker(FakeWorker):
    def __init__(self, config: Any, engine: EngineInfo) -> None:
        from kvconnect.config import backend_name

        super().__init__(backend_name(config), engine=engine)
        self.config = config


def request(rid: str, n_tokens: int = 64, **kw: Any) -> RequestView:
    return RequestView(request_id=rid, prompt_token_ids=list(range(n_tokens)), **kw)


class MultiRig:
    """A MultiScheduler and one MultiWorker over fake children, driven one engine step at a time
    the way an adapter drives them (metadata -> worker step -> results -> scheduler)."""

    def __init__(self, *pairs: FakePair, engine: EngineInfo | None = None) -> None:
        from kvconnect.multi import MultiScheduler, MultiWorker

        self.engine = engine or EngineInfo(engine_id="e0", block_sizes=(16,))
        self.pairs = {p.name: p for p in pairs}
        names = [p.name for p in pairs]
        self.scheduler = MultiScheduler([p.scheduler for p in pairs], self.engine, names)
        self.worker = MultiWorker([p.worker for p in pairs], self.engine, names)
        self.last_meta: Any = None

    def __getitem__(self, name: str) -> FakePair:
        return self.pairs[name]

    def admit(self, rid: str, block_ids: BlockIds, num_computed: int = 0, n_tokens: int = 64):
        """Lookup + allocation as the engine does it; returns the lookup answer."""
        req = request(rid, n_tokens)
        n, is_async = self.scheduler.get_num_new_matched_tokens(req, num_computed)
        if n is not None:
            self.scheduler.update_state_after_alloc(req, block_ids, n)
        return n, is_async

    def finish(self, rid: str, block_ids: BlockIds = ((),)):
        return self.scheduler.request_finished(request(rid), block_ids)

    def step(self, step: StepView | None = None, layers: Iterable[str] = ("l0", "l1")) -> TransferResults:
        step = step or StepView()
        meta = self.scheduler.build_step_metadata(step)
        self.last_meta = meta
        w = self.worker
        w.bind_step_metadata(meta)
        w.start_load_kv()
        for layer in layers:
            w.wait_for_layer_load(layer)
            w.save_kv_layer(layer, None)
        w.wait_for_save()
        results = w.get_transfer_results(set(step.finished_request_ids))
        w.clear_step_metadata()
        self.scheduler.update_worker_output(results)
        return results
