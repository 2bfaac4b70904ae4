"""Every stat the P/D core reports (NIXL and MoRI-IO alike), declared once so that each appears
on the engine's metrics from the start, at zero: the counters are :class:`PDCounters`."""

from dataclasses import dataclass

from kvconnect.telemetry import Counters, StatNames


@dataclass(slots=True)
class PDCounters(Counters):
    """What a P/D worker reports each step (summed over workers and steps on /metrics)."""

    # consumer (decode) side
    loads_done: int = 0
    bytes_received: int = 0
    descriptors: int = 0
    transfer_s: float = 0.0
    loads_failed: int = 0
    #: Loads whose request the engine aborted while they were in flight.
    loads_aborted: int = 0
    #: Loads refused before any transfer (malformed or incompatible transfer params).
    loads_rejected: int = 0
    loads_released: int = 0
    checksum_failures: int = 0
    checksums_verified: int = 0
    # producer (prefill) side
    leases_done: int = 0
    leases_expired: int = 0
    bytes_sent: int = 0
    writes_failed: int = 0


STATS = StatNames(counters=PDCounters.names(), transfers=("load",))
