"""Scheduler half of the MultiConnector: composes any SchedulerConnectors, in priority order.

Rules (DESIGN.md, "MultiConnector semantics"), and the choices made where it leaves room:

Load lookup
    With ``load_rule: "longest"`` (config) every child is asked; the longest hit owns the load
    (the earlier child on a tie) and any "ask again later" makes the answer None. Otherwise
    (``first``, the default) children are asked in order. The first child with a non-zero hit owns the load;
    the children after it are **not asked**. vLLM asks every child and keeps the first hit; we stop because a
    lower-priority child cannot change the answer, because its "ask again later" (None) would
    stall a request that a higher tier can serve now, and because a lookup that is never used
    may pin blocks that then only need releasing (and costs hot-path time). A child before the
    first hit that says "ask again later" makes the whole answer None: it might yet have a hit,
    and it has priority. The owner is remembered per request until allocation.
Allocation notice
    Every child gets the engine's block ids; the owner gets ``num_external_tokens``, every other
    child 0 (a child that pinned blocks during a lookup must release them on 0).
Store
    Every child sees the same StepView (``build_step_metadata``) and every ``request_finished``:
    every child that stores gets every block.
Request finished
    Every child is told. Transfer params are merged into one dict; a key set by two children is
    a :class:`ConfigError` naming both and the key. ``delay_free`` is True when any child asked
    to defer; the MultiWorker reports the request in ``finished_sending`` only once every child
    that deferred it has (see :mod:`kvconnect.multi.completion`).
Worker output
    Each child's ``update_worker_output`` gets its own part: the requests it deferred that are
    now sent (and failed, when any child's send of them failed: the composed output cannot say
    which), the loads it owns that ended, every invalid block id (a block id does not say
    whose it is; a child ignores ids it did not load), and its stats.
Handshake metadata / stats / gauges
    Keyed by child name; ``set_handshake_metadata`` routes each child's part back to it.
KV cache events
    Every child's, in child order (each names its own medium).
Hybrid models
    Supported only when every child supports them.

A child that raises
    ``get_num_new_matched_tokens``: logged; the child counts as a miss and the next is asked
    (computing tokens locally is always correct, so a broken tier never fails a request).
    ``update_state_after_alloc``: logged; the other children are still notified. If the raising
    child owned the load, the load is failed through the engine's load-failure path (the worker
    reports its blocks invalid and, for an asynchronous load, the request received and failed),
    so the request recomputes instead of hanging or reading blocks nobody filled.
    ``build_step_metadata``: logged; the child sits this step out on the worker (its slot is
    None and the MultiWorker does not call it), and the loads it owned in the step fail as above.
    ``request_finished``: logged; the others are still told; the child counts as not deferring
    and giving no params. ``update_worker_output``, ``set_handshake_metadata``, ``get_stats``,
    ``take_events``, ``get_gauges``: logged, the others still called. ``shutdown``: every child is shut down,
    then the first error is raised. A :class:`ConfigError` is never swallowed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from kvconnect.api import (
    BlockIds,
    EngineInfo,
    RequestView,
    SchedulerConnector,
    StepView,
    TransferResults,
)
from kvconnect.errors import ConfigError, KVConnectError, WireError
from kvconnect.multi.metadata import LoadNote, MultiStepMetadata, compose

logger = logging.getLogger(__name__)


def external_blocks(block_ids: BlockIds, block_sizes: Sequence[int], num_computed: int,
                    num_external: int) -> tuple[int, ...]:
    """Engine block ids holding tokens ``[num_computed, num_computed + num_external)``, over all
    groups (``block_ids`` lists each group's blocks from token 0)."""
    if num_external <= 0:
        return ()
    out: list[int] = []
    for g, ids in enumerate(block_ids):
        bs = block_sizes[g] if g < len(block_sizes) else block_sizes[0]
        first = num_computed // bs
        last = -(-(num_computed + num_external) // bs)
        out.extend(ids[first:last])
    return tuple(out)


class MultiScheduler(SchedulerConnector):
    """Scheduler half composing ``children`` (highest load priority first)."""

    def __init__(self, children: Sequence[SchedulerConnector], engine: EngineInfo,
                 names: Sequence[str] | None = None, *, unsupported_model: str = "fail",
                 load_rule: str = "first", refused: Sequence[tuple[str, str]] = ()) -> None:
        """Compose built ``children`` (highest load priority first), named ``names`` (by default
        after their classes). ``refused``: ``(name, why)`` of children whose build refused the
        model (:func:`kvconnect.multi.metadata.compose`). :func:`kvconnect.registry.create_scheduler`
        builds the children from a config and calls this."""
        if load_rule not in ("first", "longest"):
            raise ConfigError(f"load_rule must be 'first' or 'longest', got {load_rule!r}")
        built, names = compose(children, names, engine, unsupported_model, refused)
        self._setup(built, names, engine)
        self._longest = load_rule == "longest"

    def _setup(self, children: list[SchedulerConnector], names: list[str], engine: EngineInfo) -> None:
        self.children = children
        self.names = names
        self.engine = engine
        #: request -> (owner index, is_async, num_computed_tokens) of its latest lookup.
        self._lookup: dict[str, tuple[int, bool, int]] = {}
        #: request -> owner of an asynchronous load not yet reported received.
        self._loading: dict[str, int] = {}
        #: request -> children that deferred it and whose blocks the engine still holds.
        self._held: dict[str, tuple[int, ...]] = {}
        #: Recorded since the last build_step_metadata.
        self._new_deferred: dict[str, tuple[int, ...]] = {}
        self._new_loads: dict[str, LoadNote] = {}
        self._errors = dict.fromkeys(names, 0)
        #: (request, owner) of the latest allocation notice with external tokens.
        self._last_owner: tuple[str, int] | None = None

    @property  # type: ignore[override]
    def supports_hybrid(self) -> bool:
        return all(c.supports_hybrid for c in self.children)

    @property  # type: ignore[override]
    def reads_step(self) -> bool:
        return any(c.reads_step for c in self.children)

    def _failed(self, i: int, what: str, rid: str | None = None) -> None:
        self._errors[self.names[i]] += 1
        logger.exception("child %s raised in %s%s", self.names[i], what,
                         f" (request {rid})" if rid is not None else "")

    # -- load --------------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        rid = request.request_id
        self._lookup.pop(rid, None)
        if self._longest:
            return self._longest_hit(request, num_computed_tokens)
        for i, c in enumerate(self.children):
            try:
                n, is_async = c.get_num_new_matched_tokens(request, num_computed_tokens)
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "get_num_new_matched_tokens", rid)
                continue
            if n is None:
                return None, False
            if n > 0:
                self._lookup[rid] = (i, bool(is_async), num_computed_tokens)
                return n, is_async
        return 0, False

    def _longest_hit(self, request: RequestView, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        best, best_async, owner, later = 0, False, -1, False
        for i, c in enumerate(self.children):
            try:
                n, is_async = c.get_num_new_matched_tokens(request, num_computed_tokens)
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "get_num_new_matched_tokens", rid)
                continue
            if n is None:
                later = True
            elif n > best:
                best, best_async, owner = n, bool(is_async), i
        if later:
            return None, False
        if owner >= 0:
            self._lookup[rid] = (owner, best_async, num_computed_tokens)
        return best, best_async

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        lookup = self._lookup.pop(rid, None)
        if num_external_tokens > 0 and lookup is None:
            raise KVConnectError(
                f"request {rid}: the engine accepted {num_external_tokens} external tokens but no "
                "child offered any (update_state_after_alloc without a matching lookup)"
            )
        owner = lookup[0] if lookup is not None and num_external_tokens > 0 else -1
        for i, c in enumerate(self.children):
            try:
                c.update_state_after_alloc(request, block_ids, num_external_tokens if i == owner else 0)
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "update_state_after_alloc", rid)
                if i == owner:
                    owner = -2  # the load cannot happen: fail it below
        if lookup is None or num_external_tokens <= 0:
            return
        i, is_async, num_computed = lookup
        self._last_owner = (rid, i)
        blocks = external_blocks(block_ids, self.engine.block_sizes, num_computed, num_external_tokens)
        note = LoadNote(child=i, is_async=is_async, blocks=blocks, failed=owner == -2)
        self._new_loads[rid] = note
        if is_async and not note.failed:
            self._loading[rid] = i

    # -- per step ----------------------------------------------------------------------------

    def build_step_metadata(self, step: StepView) -> MultiStepMetadata:
        metas: list[Any] = []
        skipped: list[int] = []
        for i, c in enumerate(self.children):
            try:
                metas.append(c.build_step_metadata(step))
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "build_step_metadata")
                metas.append(None)
                skipped.append(i)
                self._fail_loads_of(i)
        meta = MultiStepMetadata(children=tuple(metas), deferred=self._new_deferred, loads=self._new_loads,
                                 skipped=tuple(skipped))
        self._new_deferred = {}
        self._new_loads = {}
        return meta

    def _fail_loads_of(self, i: int) -> None:
        for rid, note in list(self._new_loads.items()):
            if note.child == i and not note.failed:
                self._new_loads[rid] = LoadNote(child=i, is_async=note.is_async, blocks=note.blocks,
                                                failed=True)
                self._loading.pop(rid, None)

    # -- finish ------------------------------------------------------------------------------

    def request_finished(
        self, request: RequestView, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._lookup.pop(rid, None)
        deferring: list[int] = []
        merged: dict[str, Any] | None = None
        setter: dict[str, int] = {}
        clashes: list[tuple[str, int, int]] = []
        for i, c in enumerate(self.children):
            try:
                delay, params = c.request_finished(request, block_ids)
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "request_finished", rid)
                continue
            if delay:
                deferring.append(i)
            if params:
                if merged is None:
                    merged = {}
                for k, v in params.items():
                    if k in setter:
                        clashes.append((k, setter[k], i))
                        continue
                    setter[k] = i
                    merged[k] = v
        if deferring:
            held = tuple(deferring)
            self._held[rid] = held
            self._new_deferred[rid] = held
        if clashes:
            desc = "; ".join(f"'{k}' set by both {self.names[a]} and {self.names[b]}" for k, a, b in clashes)
            raise ConfigError(
                f"request {rid}: transfer params clash between children: {desc}. Two backends in "
                "one composition must not both answer the router (e.g. two P/D backends)"
            )
        return bool(deferring), merged

    def update_worker_output(self, results: TransferResults) -> None:
        # Each child gets its own sets (a child may keep or change what it is given).
        parts = [TransferResults(invalid_block_ids=set(results.invalid_block_ids)) for _ in self.children]
        for rid in results.finished_sending | results.failed_sending:
            failed = rid in results.failed_sending
            for i in self._held.pop(rid, ()):
                parts[i].finished_sending.add(rid)
                if failed:
                    # The engine's output cannot say which child failed: every child that
                    # deferred is told (one that stored fine drops its copy: a lost cache
                    # entry, never wrong KV).
                    parts[i].failed_sending.add(rid)
        for rid in results.finished_recving | results.failed_recving:
            owner = self._loading.pop(rid, None)
            targets = range(len(self.children)) if owner is None else (owner,)
            for i in targets:
                parts[i].finished_recving.add(rid)
                if rid in results.failed_recving:
                    parts[i].failed_recving.add(rid)
        if results.stats:
            for i, name in enumerate(self.names):
                s = results.stats.get(name)
                if s:
                    parts[i].stats = dict(s)
        for i, c in enumerate(self.children):
            try:
                c.update_worker_output(parts[i])
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "update_worker_output")

    # -- handshake, stats, shutdown ----------------------------------------------------------

    def set_handshake_metadata(self, metadata: Mapping[int, Any]) -> None:
        """``metadata``: TP rank -> what that rank's MultiWorker published (child name -> its part)."""
        per_child: list[dict[int, Any]] = [{} for _ in self.children]
        index = {n: i for i, n in enumerate(self.names)}
        for rank, by_child in metadata.items():
            if by_child is None:
                continue
            if not isinstance(by_child, Mapping):
                raise WireError(
                    f"handshake metadata of rank {rank}: expected a dict keyed by child name "
                    f"{self.names}, got {type(by_child).__name__}"
                )
            for name, part in by_child.items():
                i = index.get(name)
                if i is None:
                    logger.warning("handshake metadata of rank %s names unknown child %r (children: %s)",
                                   rank, name, self.names)
                elif part is not None:
                    per_child[i][rank] = part
        for i, c in enumerate(self.children):
            if not per_child[i]:
                continue
            try:
                c.set_handshake_metadata(per_child[i])
            except ConfigError:
                raise
            except Exception:
                self._failed(i, "set_handshake_metadata")

    def get_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, (name, c) in enumerate(zip(self.names, self.children)):
            try:
                s = dict(c.get_stats())
            except Exception:
                self._failed(i, "get_stats")
                s = {}
            if self._errors[name]:
                s["multi_child_errors"] = self._errors[name]
            out[name] = s
        return out

    def hit_source_of(self, request_id: str) -> str | None:
        last = self._last_owner
        if last is None or last[0] != request_id:
            return None
        return self.children[last[1]].hit_source_of(request_id)

    def take_events(self) -> list[Any]:
        out: list[Any] = []
        for i, c in enumerate(self.children):
            try:
                out.extend(c.take_events())
            except Exception:
                self._failed(i, "take_events")
        return out

    def get_gauges(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, (name, c) in enumerate(zip(self.names, self.children)):
            try:
                g = c.get_gauges()
            except Exception:
                self._failed(i, "get_gauges")
                continue
            if g:
                out[name] = g
        return out

    def shutdown(self) -> None:
        first: BaseException | None = None
        for i, c in enumerate(self.children):
            try:
                c.shutdown()
            except Exception as e:
                self._failed(i, "shutdown")
                first = first or e
        if first is not None:
            raise first
