"""Every stat the Mooncake shared tier's workers report, declared once so that each appears on the
engine's metrics from the start, at zero."""

from kvconnect.telemetry import StatNames

STATS = StatNames(
    counters=(
        "load_bytes", "load_blocks", "load_seconds", "load_failures",
        "save_bytes", "save_seconds", "save_failures", "saves_dropped",
        "objects_present", "objects_stored", "objects_missing", "objects_corrupt",
        "put_failures", "deadline_misses",
    ),
)
