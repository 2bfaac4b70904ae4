"""A backend's counters are a declared record: a misspelt name fails instead of starting a new
metric series, and a worker's report carries what moved since the last one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from kvconnect.backends.cpu_offload.stats import STATS, LoadCheck, WorkerCounters
from kvconnect.telemetry import Counters

pytestmark = pytest.mark.unit


@dataclass(slots=True)
class Two(Counters):
    done: int = 0
    seconds: float = 0.0


def test_a_misspelt_counter_raises_instead_of_adding_a_series():
    c = Two()
    with pytest.raises(AttributeError):
        c.dnoe += 1  # type: ignore[attr-defined]
    assert c.as_dict() == {"done": 0, "seconds": 0.0}


def test_take_reports_what_moved_and_starts_again_from_zero():
    c = Two()
    c.done += 2
    assert c.take() == {"done": 2}
    assert c.take() == {} and c.as_dict() == {"done": 0, "seconds": 0.0}


def test_the_cpu_tier_declares_exactly_its_worker_counters():
    assert STATS.counters == WorkerCounters.names()
    c = WorkerCounters()
    c.add_copy("store", 100, 2, 0.5)
    c.add_failure("load", LoadCheck.CHECKSUM)
    assert c.take() == {"store_bytes": 100, "store_blocks": 2, "store_seconds": 0.5,
                        "load_failures": 1, "checksum_failures": 1}
