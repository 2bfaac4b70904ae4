"""Every stat the CPU offload tier reports, declared once: the worker's counters are
:class:`WorkerCounters` (on the engine's metrics from the start, at zero), the scheduler's
diagnostic snapshot (``get_stats``) counts in :class:`SchedulerCounters`."""

import enum
from dataclasses import dataclass

from kvconnect.telemetry import Counters, StatNames


class LoadCheck(enum.Enum):
    """A check that refused a load before its copy (each is counted on its own)."""

    KEY_MISMATCH = enum.auto()
    CHECKSUM = enum.auto()


@dataclass(slots=True)
class WorkerCounters(Counters):
    """What a worker reports each step (summed over workers and steps on /metrics)."""

    load_bytes: int = 0
    load_blocks: int = 0
    load_seconds: float = 0.0
    load_failures: int = 0
    store_bytes: int = 0
    store_blocks: int = 0
    store_seconds: float = 0.0
    store_failures: int = 0
    #: A load found its slot holding another block (evicted or overwritten meanwhile).
    key_mismatches: int = 0
    #: A load found its slot's bytes failing their checksum (``verify_checksums``).
    checksum_failures: int = 0

    def add_copy(self, kind: str, nbytes: int, blocks: int, seconds: float) -> None:
        """One finished copy of ``kind`` (``load`` or ``store``)."""
        if kind == "load":
            self.load_bytes += nbytes
            self.load_blocks += blocks
            self.load_seconds += seconds
        else:
            self.store_bytes += nbytes
            self.store_blocks += blocks
            self.store_seconds += seconds

    def add_failure(self, kind: str, check: LoadCheck | None = None) -> None:
        """One failed copy of ``kind``; ``check``: the check that refused it, if one did."""
        if kind == "load":
            self.load_failures += 1
        else:
            self.store_failures += 1
        if check is LoadCheck.KEY_MISMATCH:
            self.key_mismatches += 1
        elif check is LoadCheck.CHECKSUM:
            self.checksum_failures += 1


@dataclass(slots=True)
class SchedulerCounters(Counters):
    """The scheduler half's own counts (its ``get_stats``; not exported as metrics)."""

    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    load_failures: int = 0
    store_failures: int = 0
    loaded_tokens: int = 0
    stored_tokens: int = 0
    stored_blocks: int = 0
    skipped_stores: int = 0


STATS = StatNames(
    counters=WorkerCounters.names(),
    transfers=("load", "store"),
    gauges=("held_blocks", "held_bytes", "capacity_blocks"),
)
