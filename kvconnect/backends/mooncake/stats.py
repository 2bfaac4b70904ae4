"""Every stat the Mooncake shared tier reports, declared once: the workers' counters are
:class:`WorkerCounters` (on the engine's metrics from the start, at zero), the scheduler half's
diagnostic snapshot (``get_stats``) counts in :class:`SchedulerCounters`. A misspelt name raises
AttributeError instead of starting a new metric series."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvconnect.telemetry import Counters, StatNames


@dataclass(slots=True)
class WorkerCounters(Counters):
    """What a worker reports each step (summed over workers and steps on /metrics); each job
    counts in one of its own, added to the worker's when the engine collects the job."""

    load_bytes: int = 0
    load_blocks: int = 0
    load_seconds: float = 0.0
    load_failures: int = 0
    save_bytes: int = 0
    save_seconds: float = 0.0
    save_failures: int = 0
    #: Objects of a store not put: the store was unavailable or did not answer.
    saves_dropped: int = 0
    #: Objects a store found in the store already (not put again).
    objects_present: int = 0
    objects_stored: int = 0
    #: Objects a load did not get whole (missing, evicted, of another size, the call failed).
    objects_missing: int = 0
    #: Objects a load got that failed verification (header or checksum); each is removed.
    objects_corrupt: int = 0
    put_failures: int = 0
    #: Jobs that passed their deadline (queued, or between two batches).
    deadline_misses: int = 0

    def add(self, other: WorkerCounters) -> None:
        """Every counter of ``other`` added to this record."""
        for n in self.names():
            setattr(self, n, getattr(self, n) + getattr(other, n))

    def add_reported(self, stats: Mapping[str, object]) -> None:
        """A worker's report (``TransferResults.stats``) summed in; names this record does not
        declare (none, from this tier's workers) are ignored."""
        for n in self.names():
            v = stats.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                setattr(self, n, getattr(self, n) + v)


@dataclass(slots=True)
class SchedulerCounters(Counters):
    """The scheduler half's own counts (its ``get_stats``; not exported as metrics)."""

    lookups: int = 0
    lookup_hits: int = 0
    #: Lookups whose answer was not in by ``lookup_timeout_s`` (a miss).
    lookup_timeouts: int = 0
    #: Lookups not asked: the store was backing off after a failed call (a miss).
    lookups_skipped: int = 0
    hit_tokens: int = 0
    loads_planned: int = 0
    saves_planned: int = 0
    #: Stores not planned: the store was backing off.
    saves_skipped: int = 0
    save_blocks_planned: int = 0
    #: Loads the workers reported with invalid blocks (their tail is recomputed).
    loads_invalid: int = 0


STATS = StatNames(counters=WorkerCounters.names())
