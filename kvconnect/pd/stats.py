"""Every stat the P/D core reports (NIXL and MoRI-IO alike), declared once so that each appears
on the engine's metrics from the start, at zero."""

from kvconnect.telemetry import StatNames

STATS = StatNames(
    counters=(
        # consumer (decode) side
        "loads_done", "bytes_received", "descriptors", "transfer_s", "loads_failed", "loads_aborted",
        "loads_rejected", "loads_released", "checksum_failures", "checksums_verified",
        # producer (prefill) side
        "leases_done", "leases_expired", "bytes_sent", "writes_failed",
    ),
    transfers=("load",),
)
