"""How much host memory each half assumes, and how many slots that makes.

Both halves compute the slot count with :func:`slot_count` from the same two numbers, so it is
identical on the scheduler and on every worker:

* the rank's capacity: ``cpu_bytes_to_use`` split evenly over TP ranks (or taken as is with
  ``per_rank``);
* ``kv_bytes_per_block``: the payload bytes of one engine block summed over every layer of one
  rank. The worker measures it from the KV tensors it registers; the scheduler learns it either
  up front from ``EngineInfo.kv_bytes_per_block`` (the adapter fills it from the engine's KV spec)
  or from the workers' handshake metadata (:class:`OffloadHandshake`). When both are present they
  must agree.
"""

from __future__ import annotations

from kvconnect.backends.cpu_offload.policies import POLICIES
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError

#: The ``EngineInfo.model_signature`` entry the scheduler reads its block size in bytes from.
KV_BYTES_PER_BLOCK = "kv_bytes_per_block"


def engine_hint(engine) -> int | None:
    """Block bytes the engine announced up front (``EngineInfo.kv_bytes_per_block``, or the older
    ``model_signature`` entry), or None."""
    if getattr(engine, "kv_bytes_per_block", 0):
        return int(engine.kv_bytes_per_block)
    hint = engine.model_signature.get(KV_BYTES_PER_BLOCK)
    return int(hint) if hint is not None else None


def slot_hint(engine) -> int | None:
    """Bytes of one host slot as the engine announced them, or None. A slot holds one block of
    one KV-cache group; the engine's figure sums every group (hybrid models have equal groups)."""
    hint = engine_hint(engine)
    groups = max(len(engine.block_sizes), 1)
    if hint is None or groups == 1:
        return hint
    if hint % groups:
        raise ConfigError(
            f"cpu_offload: {hint} KV bytes per block do not split evenly over {groups} KV-cache groups"
        )
    return hint // groups


def validate(cfg: CpuOffloadConfig) -> None:
    """Checks that hold whatever the model; config parsing does them too, but a config built
    directly (tests, other callers) reaches the backend unchecked."""
    if not isinstance(cfg.cpu_bytes_to_use, int) or cfg.cpu_bytes_to_use <= 0:
        raise ConfigError(f"cpu_offload.cpu_bytes_to_use must be > 0, got {cfg.cpu_bytes_to_use!r}")
    if cfg.eviction_policy not in POLICIES:
        raise ConfigError(
            f"cpu_offload.eviction_policy: unknown policy {cfg.eviction_policy!r}; "
            f"known: {sorted(POLICIES)}"
        )
    if cfg.store_mode not in ("finish", "fill"):
        raise ConfigError(f"cpu_offload.store_mode must be 'finish' or 'fill', got {cfg.store_mode!r}")
    if cfg.copy_threads <= 0:
        raise ConfigError(f"cpu_offload.copy_threads must be > 0, got {cfg.copy_threads}")


def rank_capacity(cfg: CpuOffloadConfig, tp_size: int) -> int:
    """Host bytes one TP rank may use."""
    if tp_size <= 0:
        raise ConfigError(f"tp_size must be positive, got {tp_size}")
    return cfg.cpu_bytes_to_use if cfg.per_rank else cfg.cpu_bytes_to_use // tp_size


def slot_count(cfg: CpuOffloadConfig, tp_size: int, kv_bytes_per_block: int) -> int:
    """Slots of one block each that fit in the rank's capacity; a ConfigError when not one does."""
    if kv_bytes_per_block <= 0:
        raise ConfigError(f"kv_bytes_per_block must be positive, got {kv_bytes_per_block}")
    cap = rank_capacity(cfg, tp_size)
    n = cap // kv_bytes_per_block
    if n < 1:
        where = "per rank" if cfg.per_rank else f"in total over {tp_size} TP rank(s), {cap} per rank"
        raise ConfigError(
            f"cpu_offload.cpu_bytes_to_use={cfg.cpu_bytes_to_use} ({where}) is smaller than one "
            f"KV block ({kv_bytes_per_block} bytes summed over this rank's layers); give at least "
            f"{kv_bytes_per_block * (1 if cfg.per_rank else tp_size)} bytes"
        )
    return n
