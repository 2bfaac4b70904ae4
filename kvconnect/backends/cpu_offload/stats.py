"""Every stat the CPU offload tier reports, declared once so that each appears on the engine's
metrics from the start, at zero."""

from kvconnect.telemetry import StatNames

STATS = StatNames(
    counters=(
        "load_bytes", "load_blocks", "load_seconds", "load_failures",
        "store_bytes", "store_blocks", "store_seconds", "store_failures",
        "key_mismatches", "checksum_failures",
    ),
    transfers=("load", "store"),
    gauges=("held_blocks", "held_bytes", "capacity_blocks"),
)
