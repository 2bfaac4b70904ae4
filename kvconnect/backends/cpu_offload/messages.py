"""Wire types of the CPU offload backend: the per-step metadata the scheduler half hands the
workers, and the handshake a worker publishes about its host pool. All msgspec Structs."""

from __future__ import annotations

import msgspec


class _Wire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class LoadJob(_Wire, frozen=True):
    """Copy host slots into engine blocks (a prefix hit). ``keys[i]`` is the prefix key the
    scheduler believes ``slots[i]`` holds; the worker refuses to copy a slot holding anything else."""

    request_id: str
    block_ids: list[int]
    slots: list[int]
    keys: list[bytes]
    #: KV-cache group of each block (hybrid models); empty: every block is in group 0.
    groups: list[int] = msgspec.field(default_factory=list)
    #: Set when the scheduler cannot serve the load it was asked for: the worker fails it at once
    #: (reported as a failed receive covering ``block_ids``) without copying anything.
    error: str | None = None


class StoreJob(_Wire, frozen=True):
    """Copy engine blocks into host slots under the given prefix keys."""

    request_id: str
    block_ids: list[int]
    slots: list[int]
    keys: list[bytes]
    #: KV-cache group of each block (hybrid models); empty: every block is in group 0.
    groups: list[int] = msgspec.field(default_factory=list)
    #: The blocks are written by this step's forward pass: copy only after it (``wait_for_save``).
    after_forward: bool = False


class OffloadStepMetadata(_Wire, frozen=True):
    """Everything one engine step asks of the workers."""

    loads: list[LoadJob] = msgspec.field(default_factory=list)
    stores: list[StoreJob] = msgspec.field(default_factory=list)
    #: Requests preempted this step: their blocks may be reused by this step's forward pass, so
    #: the worker finishes their in-flight copies before the forward starts.
    preempted: list[str] = msgspec.field(default_factory=list)
    #: Requests the engine finished with ``delay_free=True``: report each in ``finished_sending``
    #: once every job issued for it has completed.
    closed: list[str] = msgspec.field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.preempted or self.closed)


class OffloadHandshake(_Wire, frozen=True):
    """What a worker tells the scheduler half about its host pool (via handshake metadata), so
    both halves agree on the number of slots."""

    tp_rank: int
    #: Bytes of one slot: one engine block of one KV-cache group, summed over that group's layers
    #: on this rank.
    kv_bytes_per_block: int
    #: Host slots this rank allocated (one engine block each).
    num_slots: int
