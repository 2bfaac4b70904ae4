"""Per-child completion counting on the worker side of the MultiConnector. Pure bookkeeping, no I/O.

Why here, and not in the scheduler half: the engine frees a request's blocks as soon as the
(TP-aggregated) worker output names it in ``finished_sending``, and starts a waiting request as
soon as it names it in ``finished_recving``. So what each MultiWorker reports must already be
right per child; counting across TP ranks is then the ordinary aggregation on top (a request is
done when every rank reported it, and each rank reports it only when every child on that rank
finished it: together, every child on every rank).

The scheduler half knows which children deferred a request and which child owns a load; it sends
both in :class:`~kvconnect.multi.metadata.MultiStepMetadata`. That metadata is bound before any
child learns of the request from its own metadata (they travel together), so a child can only
report a request after the tracker knows who must report it. A report that still arrives first
(a child that learned of a request some other way) is held, credited when the deferral record
arrives, and dropped with a warning after :data:`EARLY_REPORT_TTL_STEPS` steps without one: it
is never passed through, because the engine freeing blocks that another child still reads would
hand a remote peer wrong KV.

Sends: a request is reported once every child that deferred it has reported it; a child that did
not defer it does not count, and its report is ignored. A child's ``failed_sending`` counts as its
report and marks the request: it is reported in ``failed_sending`` too (union over children).
Receives: a request is reported when its owning child reports it (a report from another child is
ignored: the engine waits for one completion, and only the owner writes into the blocks). A load
not known to the tracker (a synchronous one, or one the scheduler did not note) is passed through,
so that a completion is never swallowed and a request never hangs.
Failures: failed receives and invalid block ids are unioned over children. When a child raises
while it should be loading, the MultiWorker fails that child's loads of the step here: their
blocks are reported invalid and the asynchronous ones finished and failed, so the engine
recomputes them instead of waiting forever or reading blocks nobody filled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kvconnect.api import TransferResults
from kvconnect.multi.metadata import LoadNote

logger = logging.getLogger(__name__)

#: Steps a ``finished_sending`` report waits for the deferral record it belongs to.
EARLY_REPORT_TTL_STEPS = 1000


class CompletionTracker:
    """Folds the children's :class:`TransferResults` of one worker into the composition's."""

    def __init__(self, names: Sequence[str], early_report_ttl_steps: int = EARLY_REPORT_TTL_STEPS) -> None:
        self.names = list(names)
        self.early_report_ttl_steps = early_report_ttl_steps
        self._step = 0
        #: request -> children that deferred it and have not reported it yet.
        self._awaiting: dict[str, set[int]] = {}
        #: request -> (child -> its report failed, for reports that came before the deferral
        #: record; step first seen).
        self._early: dict[str, tuple[dict[int, bool], int]] = {}
        #: requests whose send some deferring child reported failed (until reported).
        self._send_failed: set[str] = set()
        #: request -> owning child of an asynchronous load in flight.
        self._loading: dict[str, int] = {}
        #: request -> child whose load was already reported failed here (its late report is dropped).
        self._cancelled: dict[str, int] = {}
        self._out = TransferResults()

    # -- from the step metadata -------------------------------------------------------------

    def on_bind(self, deferred: Mapping[str, Sequence[int]], loads: Mapping[str, LoadNote]) -> None:
        self._step += 1
        for rid, children in deferred.items():
            owed = set(children)
            early = self._early.pop(rid, None)
            if early is not None:
                for child, failed in early[0].items():
                    if child in owed:
                        owed.discard(child)
                        if failed:
                            self._send_failed.add(rid)
            if owed:
                self._awaiting[rid] = owed
            else:
                self._emit_sent(rid)
        for rid, note in loads.items():
            if note.failed:
                self._fail_load(rid, note)
            elif note.is_async:
                self._loading[rid] = note.child
                self._cancelled.pop(rid, None)
        if self._early:
            self._purge_early()

    def _purge_early(self) -> None:
        limit = self._step - self.early_report_ttl_steps
        for rid in [r for r, (_, seen) in self._early.items() if seen < limit]:
            children, _ = self._early.pop(rid)
            logger.warning(
                "children %s reported request %s finished_sending but no child deferred it; ignored",
                sorted(self.names[i] for i in children),
                rid,
            )

    def fail_child_loads(self, child: int, loads: Mapping[str, LoadNote]) -> list[str]:
        """Fail every load of this step that ``child`` owns (it raised while loading)."""
        failed = []
        for rid, note in loads.items():
            if note.child == child and not note.failed and rid not in self._cancelled:
                self._fail_load(rid, note)
                failed.append(rid)
        return failed

    def _fail_load(self, rid: str, note: LoadNote) -> None:
        self._out.invalid_block_ids.update(note.blocks)
        if note.is_async:
            self._out.finished_recving.add(rid)
            self._out.failed_recving.add(rid)
            self._loading.pop(rid, None)
            self._cancelled[rid] = note.child

    # -- from the children ------------------------------------------------------------------

    def on_child_results(self, child: int, r: TransferResults) -> None:
        for rid in r.finished_sending | r.failed_sending:
            self._on_sent(child, rid, rid in r.failed_sending)
        for rid in r.finished_recving | r.failed_recving:
            if self._accept_recv(child, rid):
                self._out.finished_recving.add(rid)
                if rid in r.failed_recving:
                    self._out.failed_recving.add(rid)
        self._out.invalid_block_ids |= r.invalid_block_ids

    def _on_sent(self, child: int, rid: str, failed: bool) -> None:
        owed = self._awaiting.get(rid)
        if owed is None:
            early = self._early.get(rid)
            if early is None:
                self._early[rid] = ({child: failed}, self._step)
            else:
                early[0][child] = early[0].get(child, False) or failed
            return
        if child not in owed:
            logger.debug("%s reported %s sent but did not defer it (or reported twice); ignored",
                         self.names[child], rid)
            return
        owed.discard(child)
        if failed:
            self._send_failed.add(rid)
        if not owed:
            del self._awaiting[rid]
            self._emit_sent(rid)

    def _emit_sent(self, rid: str) -> None:
        self._out.finished_sending.add(rid)
        if rid in self._send_failed:
            self._send_failed.discard(rid)
            self._out.failed_sending.add(rid)

    def _accept_recv(self, child: int, rid: str) -> bool:
        if self._cancelled.get(rid) == child:
            del self._cancelled[rid]
            return False  # already reported failed on the child's behalf
        owner = self._loading.get(rid)
        if owner is None:
            return True  # not an async load the scheduler noted: never swallow a completion
        if owner != child:
            logger.warning("%s reported a load of %s that %s owns; ignored",
                           self.names[child], rid, self.names[owner])
            return False
        del self._loading[rid]
        return True

    # -- to the engine ----------------------------------------------------------------------

    def drain(self) -> TransferResults:
        out, self._out = self._out, TransferResults()
        return out

    def pending(self) -> dict[str, int]:
        return {"awaiting_sends": len(self._awaiting), "early_sends": len(self._early),
                "loading": len(self._loading)}
