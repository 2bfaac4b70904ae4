"""What the P/D progress thread hands the engine thread, behind one lock.

The progress thread records each load's and lease's end here as it happens; the engine thread
takes everything recorded so far once a step (:meth:`Outcomes.take`). A consumer request the
engine aborted while its load was in flight is reported in ``finished_sending`` (its blocks are
free to take back) rather than in ``finished_recving``, whichever thread learns of its end first.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from kvconnect.api import TransferResults
from kvconnect.pd.stats import PDCounters
from kvconnect.telemetry import record_transfer


class Outcomes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results = TransferResults()
        self._counters = PDCounters()
        #: per-transfer samples (:func:`~kvconnect.telemetry.record_transfer`) since the last take
        self._samples: dict[str, Any] = {}
        #: consumer requests the engine aborted while loading: their load, when it ends, is
        #: reported in ``finished_sending``, never in ``finished_recving``
        self._aborting: set[str] = set()

    # -- engine thread --------------------------------------------------------------------------
    def take(self) -> TransferResults:
        with self._lock:
            out, self._results = self._results, TransferResults()
            stats: dict[str, Any] = self._counters.take()
            if self._samples:
                stats.update(self._samples)
                self._samples = {}
            if stats:
                out.stats = stats
        return out

    def abort_loads(self, request_ids: Iterable[str]) -> None:
        """At bind time (before this step's results are taken): a load that ended but was not yet
        reported is turned into ``finished_sending`` at once; the others are noted, and reported
        so when their transfer ended."""
        with self._lock:
            for rid in request_ids:
                if rid in self._results.finished_recving:
                    self._results.finished_recving.discard(rid)
                    self._results.failed_recving.discard(rid)
                    self._results.finished_sending.add(rid)
                    self._counters.loads_aborted += 1
                else:
                    self._aborting.add(rid)

    # -- progress thread ------------------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self) -> Iterator[PDCounters]:
        """The counters, under the lock: ``with out.counting() as c: c.writes_failed += 1``."""
        with self._lock:
            yield self._counters

    def load_succeeded(self, rid: str, nbytes: int, ndescs: int, took: float) -> None:
        with self._lock:
            if not self._aborted(rid):
                self._results.finished_recving.add(rid)
            c = self._counters
            c.loads_done += 1
            c.bytes_received += nbytes
            c.descriptors += ndescs
            c.transfer_s += took
            record_transfer(self._samples, "load", took, nbytes)

    def load_failed(self, rid: str, invalid: set[int], why: str = "") -> None:
        """The load's blocks are invalid (or, for a request the engine aborted meanwhile, free)."""
        with self._lock:
            if not self._aborted(rid):
                self._results.finished_recving.add(rid)
                self._results.failed_recving.add(rid)
                self._results.invalid_block_ids |= invalid
                self._results.failure_reasons[rid] = why or "KV load failed"
            self._counters.loads_failed += 1

    def abort_without_load(self, rid: str) -> None:
        """The abort of a request with no load in flight reached the progress thread: free it now
        (unless that was done at bind time)."""
        with self._lock:
            if rid in self._aborting:
                self._aborting.discard(rid)
                self._results.finished_sending.add(rid)

    def lease_ended(self, rid: str, *, expired: bool, failure: str | None = None) -> None:
        """The lease's blocks are free; ``failure`` says why a consumer was not served."""
        with self._lock:
            self._results.finished_sending.add(rid)
            if failure is not None:
                self._results.failure_reasons[rid] = failure
            if expired:
                self._counters.leases_expired += 1
            else:
                self._counters.leases_done += 1

    def ended_loads(self) -> set[str]:
        """Loads that ended and wait for the engine to take them (for tests and tools)."""
        with self._lock:
            return set(self._results.finished_recving)

    # -- under the lock -------------------------------------------------------------------------
    def _aborted(self, rid: str) -> bool:
        """Report an aborted request's ended load as ``finished_sending``; False if not aborted."""
        if rid not in self._aborting:
            return False
        self._aborting.discard(rid)
        self._results.finished_sending.add(rid)
        self._counters.loads_aborted += 1
        return True
