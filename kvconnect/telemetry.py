"""What a backend reports about its transfers, in engine-neutral terms, and the names it declares.

A worker's ``TransferResults.stats`` is a dict of numbers (counters: summed over workers and
steps) plus two reserved sections::

    {"load_blocks": 3, "load_bytes": 196608, ...,              # counters
     "transfers": {"load": [[0.0012, 196608]], "store": []},    # one [seconds, bytes] per transfer
     "gauges": {"held_blocks": 12}}                             # levels: the latest value wins

An engine adapter keys them by backend name, turns counters into counters, ``transfers`` into
histograms of time and size, and ``gauges`` into gauges. Every backend declares the names it can
report once (:class:`StatNames`, in a light module listed in ``kvconnect.registry.STATS``), so
metrics exist, at zero, from the start. A backend's counters are a :class:`Counters` record whose
fields are those names: code adds to ``counters.load_blocks``, so a misspelt name raises instead of
starting a new metric series.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

#: Section of a backend's stats with one ``[seconds, bytes]`` sample per finished transfer.
TRANSFERS = "transfers"
#: Section of a backend's stats with levels (the latest report wins when stats are merged).
GAUGES = "gauges"


@dataclass(frozen=True)
class StatNames:
    """Every name a backend can report. Bounded: these become metric label values."""

    counters: tuple[str, ...]
    #: Transfer directions with a sample per transfer (``load``, ``store``, ...).
    transfers: tuple[str, ...] = ()
    gauges: tuple[str, ...] = ()


class Counters:
    """Base of a record of counters, one numeric field each (subclasses are
    ``@dataclass(slots=True)`` with every field defaulting to 0): ``c.load_blocks += 1`` adds,
    and assigning a name the record does not declare raises AttributeError."""

    __slots__ = ()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every counter, in declaration order (what :class:`StatNames` lists)."""
        return _field_names(cls)

    def as_dict(self) -> dict[str, float]:
        return {n: getattr(self, n) for n in _field_names(type(self))}

    def take(self) -> dict[str, float]:
        """The counters that moved since the last call, and zero them all (a worker's report)."""
        out = {}
        for n in _field_names(type(self)):
            v = getattr(self, n)
            if v:
                out[n] = v
                setattr(self, n, 0)
        return out


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def record_transfer(stats: dict[str, Any], direction: str, seconds: float, nbytes: int) -> None:
    """Add one finished transfer to a worker's stats dict."""
    stats.setdefault(TRANSFERS, {}).setdefault(direction, []).append([float(seconds), int(nbytes)])


def merge_stats(into: dict[str, Any], new: Mapping[str, Any]) -> None:
    """Sum numbers, concatenate sample lists, replace gauges, recurse into other dicts."""
    for k, v in new.items():
        if k == GAUGES and isinstance(v, Mapping):
            into[k] = dict(v)
        elif isinstance(v, Mapping):
            sub = into.get(k)
            if not isinstance(sub, dict):
                sub = into[k] = {}
            merge_stats(sub, v)
        elif isinstance(v, list):
            old = into.get(k)
            into[k] = old + v if isinstance(old, list) else list(v)
        elif (
            isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(into.get(k), (int, float))
        ):
            into[k] += v
        else:
            into[k] = v
