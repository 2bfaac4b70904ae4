"""Aggregation of finished transfers across TP workers.

Each worker reports its own view; a request is finished for the engine only when every worker
reported it. Sends and receives are counted apart; a failure reported by any worker makes the
request failed; an entry is deleted as soon as it is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvconnect.api import TransferResults
from kvconnect.telemetry import merge_stats

#: Stats merging lives with the stats format (numbers summed, samples concatenated, gauges replaced).
_merge_stats = merge_stats


class FinishedAggregator:
    def __init__(self, world_size: int) -> None:
        if world_size <= 0:
            raise ValueError(f"world_size must be positive, got {world_size}")
        self.world_size = world_size
        self._sending: dict[str, int] = {}
        self._recving: dict[str, int] = {}
        self._failed: set[str] = set()
        self._failed_send: set[str] = set()

    def _count(self, table: dict[str, int], ids: set[str], out: set[str]) -> None:
        for rid in ids:
            n = table.get(rid, 0) + 1
            if n >= self.world_size:
                table.pop(rid, None)
                out.add(rid)
            else:
                table[rid] = n

    def aggregate(self, outputs: Sequence[TransferResults | None]) -> TransferResults:
        """Fold one round of per-worker results (one entry per worker; None = nothing)."""
        out = TransferResults()
        stats: dict[str, Any] = {}
        for r in outputs:
            if r is None:
                continue
            self._failed_send |= r.failed_sending
            self._count(self._sending, r.finished_sending | r.failed_sending, out.finished_sending)
            self._failed |= r.failed_recving
            # A worker that failed also reports the request received; count it once either way.
            self._count(self._recving, r.finished_recving | r.failed_recving, out.finished_recving)
            out.invalid_block_ids |= r.invalid_block_ids
            if r.stats:
                _merge_stats(stats, r.stats)
        for rid in out.finished_recving:
            if rid in self._failed:
                self._failed.discard(rid)
                out.failed_recving.add(rid)
        for rid in out.finished_sending:
            if rid in self._failed_send:
                self._failed_send.discard(rid)
                out.failed_sending.add(rid)
        out.stats = stats or None
        return out

    def pending(self) -> int:
        return len(self._sending) + len(self._recving)

    def reset(self) -> None:
        self._sending.clear()
        self._recving.clear()
        self._failed.clear()
        self._failed_send.clear()
