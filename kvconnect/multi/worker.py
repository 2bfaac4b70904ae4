"""Worker half of the MultiConnector: every child gets every call, in child order.

Each child binds its own entry of :class:`~kvconnect.multi.metadata.MultiStepMetadata`; the
composition's transfer results are folded per child by
:class:`~kvconnect.multi.completion.CompletionTracker` (sends counted over the children that
deferred the request, receives taken from the owning child, failures unioned).

A child that raises
    ``register_kv_caches``: raised at once, naming the child (start-up must fail loudly).
    ``bind_step_metadata``, ``start_load_kv``, ``wait_for_layer_load``: logged; the child sits out
    the rest of the step and every load it owned in the step is failed through the engine's
    load-failure path (blocks invalid; asynchronous loads reported received and failed). The
    other children, and their requests, go on.
    ``save_kv_layer``, ``wait_for_save``: logged; the child sits out the rest of the step (a
    store it misses is a lost cache entry, never wrong KV).
    ``get_transfer_results``: logged; that child reports nothing this step, the others' results
    are reported as usual.
    ``clear_step_metadata``, ``get_handshake_metadata``: logged, the others still called.
    ``shutdown``: every child is shut down, then the first error is raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvconnect.api import EngineInfo, TransferResults, WorkerConnector
from kvconnect.errors import WireError
from kvconnect.multi.completion import CompletionTracker
from kvconnect.multi.metadata import LoadNote, MultiStepMetadata, compose

if TYPE_CHECKING:
    import torch

    from kvconnect.layout import KVLayout

logger = logging.getLogger(__name__)


class MultiWorker(WorkerConnector):
    """Worker half composing ``children`` (same order as the scheduler half's)."""

    def __init__(self, children: Sequence[WorkerConnector], engine: EngineInfo,
                 names: Sequence[str] | None = None, *, unsupported_model: str = "fail",
                 refused: Sequence[tuple[str, str]] = ()) -> None:
        """Compose built ``children`` (in the scheduler half's order), named ``names`` (by default
        after their classes); ``refused`` as for :class:`~kvconnect.multi.scheduler.MultiScheduler`.
        :func:`kvconnect.registry.create_worker` builds the children from a config."""
        built, names = compose(children, names, engine, unsupported_model, refused)
        self._setup(built, names, engine)

    def _setup(self, children: list[WorkerConnector], names: list[str], engine: EngineInfo) -> None:
        self.children = children
        self.names = names
        self.engine = engine
        self.tracker = CompletionTracker(names)
        self._loads: Mapping[str, LoadNote] = {}
        #: Children not called for the rest of this step.
        self._out: set[int] = set()
        self._errors = dict.fromkeys(names, 0)

    @property  # type: ignore[override]
    def supports_hybrid(self) -> bool:
        return all(c.supports_hybrid for c in self.children)

    def _log(self, i: int, what: str) -> None:
        self._errors[self.names[i]] += 1
        logger.exception("child %s raised in %s", self.names[i], what)

    def _loading_failed(self, i: int, what: str) -> None:
        self._log(i, what)
        self._out.add(i)
        failed = self.tracker.fail_child_loads(i, self._loads)
        if failed:
            logger.error("loads of %s owned by %s reported failed", sorted(failed), self.names[i])

    def _active(self) -> list[tuple[int, WorkerConnector]]:
        return [(i, c) for i, c in enumerate(self.children) if i not in self._out]

    # -- start-up ----------------------------------------------------------------------------

    def register_kv_caches(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> None:
        for name, c in zip(self.names, self.children):
            try:
                c.register_kv_caches(caches)
            except Exception:
                logger.exception("child %s failed to register the KV caches", name)
                raise

    # -- per step ----------------------------------------------------------------------------

    def bind_step_metadata(self, metadata: Any) -> None:
        if not isinstance(metadata, MultiStepMetadata):
            raise WireError(f"MultiWorker needs MultiStepMetadata, got {type(metadata).__name__}")
        if len(metadata.children) != len(self.children):
            raise WireError(
                f"step metadata has {len(metadata.children)} child entries for "
                f"{len(self.children)} children {self.names}: scheduler and worker configs differ"
            )
        self._out = set(metadata.skipped)
        self._loads = metadata.loads
        self.tracker.on_bind(metadata.deferred, metadata.loads)
        for i in metadata.skipped:
            # The scheduler half already marked this child's loads of the step failed.
            logger.warning("child %s sits this step out (its scheduler half built no metadata)",
                           self.names[i])
        for i, c in self._active():
            try:
                c.bind_step_metadata(metadata.children[i])
            except Exception:
                self._loading_failed(i, "bind_step_metadata")

    def start_load_kv(self) -> None:
        for i, c in self._active():
            try:
                c.start_load_kv()
            except Exception:
                self._loading_failed(i, "start_load_kv")

    def wait_for_layer_load(self, layer_name: str) -> None:
        for i, c in self._active():
            try:
                c.wait_for_layer_load(layer_name)
            except Exception:
                self._loading_failed(i, f"wait_for_layer_load({layer_name})")

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        for i, c in self._active():
            try:
                c.save_kv_layer(layer_name, kv_layer)
            except Exception:
                self._log(i, f"save_kv_layer({layer_name})")
                self._out.add(i)

    def wait_for_save(self) -> None:
        for i, c in self._active():
            try:
                c.wait_for_save()
            except Exception:
                self._log(i, "wait_for_save")
                self._out.add(i)

    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults:
        stats: dict[str, Any] = {}
        for i, c in enumerate(self.children):
            try:
                r = c.get_transfer_results(finished_request_ids)
            except Exception:
                self._log(i, "get_transfer_results")
                continue
            if r is None:
                continue
            self.tracker.on_child_results(i, r)
            if r.stats:
                stats[self.names[i]] = r.stats
        out = self.tracker.drain()
        out.stats = stats or None
        return out

    def clear_step_metadata(self) -> None:
        for i, c in enumerate(self.children):
            try:
                c.clear_step_metadata()
            except Exception:
                self._log(i, "clear_step_metadata")
        self._out = set()
        self._loads = {}

    # -- handshake, shutdown -----------------------------------------------------------------

    def get_handshake_metadata(self) -> dict[str, Any] | None:
        """Every child's handshake metadata, keyed by child name (None when no child has any)."""
        out: dict[str, Any] = {}
        for i, (name, c) in enumerate(zip(self.names, self.children)):
            try:
                md = c.get_handshake_metadata()
            except Exception:
                self._log(i, "get_handshake_metadata")
                continue
            if md is not None:
                out[name] = md
        return out or None

    def child_errors(self) -> dict[str, int]:
        return dict(self._errors)

    def shutdown(self) -> None:
        first: BaseException | None = None
        for i, c in enumerate(self.children):
            try:
                c.shutdown()
            except Exception as e:
                self._log(i, "shutdown")
                first = first or e
        if first is not None:
            raise first
