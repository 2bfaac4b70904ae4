"""Wire types of the mooncake backend: per-step jobs for the workers and the handshake a worker
publishes about its layout. All msgspec Structs."""

from __future__ import annotations

import msgspec


class _Wire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class StoreLoad(_Wire, frozen=True):
    """Read the objects of ``keys`` (block prefix keys, in chain order) into ``block_ids``."""

    request_id: str
    block_ids: list[int]
    keys: list[bytes]
    #: KV-cache group of each block (hybrid models); empty: every block is in group 0.
    groups: list[int] = msgspec.field(default_factory=list)
    #: Set when the scheduler cannot serve the load the engine accepted: the worker fails it at
    #: once (a failed receive covering ``block_ids``).
    error: str | None = None


class StoreSave(_Wire, frozen=True):
    """Write ``block_ids`` under ``keys``, skipping objects the store already holds."""

    request_id: str
    block_ids: list[int]
    keys: list[bytes]
    #: KV-cache group of each block (hybrid models); empty: every block is in group 0.
    groups: list[int] = msgspec.field(default_factory=list)


class MooncakeStepMetadata(_Wire, frozen=True):
    loads: list[StoreLoad] = msgspec.field(default_factory=list)
    saves: list[StoreSave] = msgspec.field(default_factory=list)
    #: Requests finished with ``delay_free=True``: report each in ``finished_sending`` once every
    #: job issued for it has returned from the store (its blocks are then no longer touched).
    closed: list[str] = msgspec.field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.closed)


class MooncakeHandshake(_Wire, frozen=True):
    """A worker's layout, so the scheduler half can name its objects in lookups."""

    tp_rank: int
    layout: bytes
    object_bytes: int
