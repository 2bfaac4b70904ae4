"""P/D wire types: the scheduler-to-worker step metadata, worker-to-worker notifications and
push-mode write requests. All msgspec Structs; peer input is decoded strictly.

The step-metadata structs are built for every request on the engine's scheduler thread: they are
kept out of the cyclic collector (``gc=False``; they hold only strings, numbers, other such structs,
tuples or lists of those, and the router's JSON params, so they can be in no reference cycle),
which vLLM's engine runs.

The scheduler hands the router's ``kv_transfer_params`` to the workers as they came
(:class:`LoadRequest`, :class:`ReleaseRequest`); the worker's progress thread checks them and turns
them into :class:`LoadSpec` / :class:`ReleaseSpec` (:mod:`kvconnect.pd.params`). Reading and
checking a dozen cold fields per request cost the engine's scheduler thread more than the rest of
the request's connector work (about 2 us of 6 at the lookup); the progress thread does it beside
the forward pass."""

from __future__ import annotations

from typing import Annotated

import msgspec

from kvconnect.errors import WireError
from kvconnect.metadata import NonNegative, Port, Positive, decode, encode

#: Per-group engine block ids, as they travel (bounds are checked where a peer's bytes are decoded).
Groups = tuple[tuple[Annotated[int, msgspec.Meta(ge=0)], ...], ...]


class Remote(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Where a peer engine is: what the router's transfer params said."""

    engine_id: str
    host: str
    #: Side-channel base port; TP rank r listens on ``port + r``.
    port: int
    tp_size: int


class LoadRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Scheduler to worker (consumer): fill ``local_block_ids`` with tokens
    ``[token_start, token_end)`` from the producer named by the router's ``params`` (unchecked:
    the worker resolves them into a :class:`LoadSpec`, or fails the load naming the bad field)."""

    request_id: str
    params: dict
    local_block_ids: Groups
    token_start: int
    token_end: int


class ReleaseRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Scheduler to worker (consumer): the request will not read the remote blocks the router's
    ``params`` name; tell the producer to free them."""

    request_id: str
    params: dict


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Worker (consumer), a checked :class:`LoadRequest`: fill ``local_block_ids`` with tokens
    ``[token_start, token_end)`` of a request the producer computed (its blocks ``remote_block_ids``)."""

    request_id: str
    remote_request_id: str
    remote: Remote
    local_block_ids: Groups
    remote_block_ids: Groups
    token_start: int
    token_end: int
    #: ``pull`` (we READ) or ``push`` (the producer WRITEs into us).
    mode: str = "pull"


class LeaseSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Producer: hold ``block_ids`` of a finished request for a consumer."""

    request_id: str
    block_ids: Groups


class ReleaseSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Worker (consumer), a checked :class:`ReleaseRequest`: the request will not read its remote
    blocks; tell the producer to free them."""

    request_id: str
    remote_request_id: str
    remote: Remote


class PDStepMetadata(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    loads: tuple[LoadRequest, ...] = ()
    leases: tuple[LeaseSpec, ...] = ()
    releases: tuple[ReleaseRequest, ...] = ()
    #: Consumer: requests the engine finished (aborted) while their load was in flight. Their
    #: blocks stay allocated (``delay_free``) until the transfer has ended; the worker then
    #: reports them in ``finished_sending`` (and never in ``finished_recving``).
    aborts: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not (self.loads or self.leases or self.releases or self.aborts)


# -- worker to worker ---------------------------------------------------------------------------
#: Consumer -> producer: this consumer rank is done with the producer's blocks (read, failed, or
#: never going to read). The producer frees once every expected consumer rank said so.
DONE = "done"
#: Producer -> consumer (push): the blocks of ``request_id`` were written.
WRITTEN = "written"
#: Producer -> consumer (push): writing failed; do not wait for the deadline.
FAILED = "failed"
NOTICE_KINDS = frozenset({DONE, WRITTEN, FAILED})


class Notice(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A transport notification. ``request_id`` is the *receiver's* request id."""

    kind: str
    request_id: str
    #: The sender's TP size and rank.
    tp_size: int
    rank: int


_MAGIC = b"kvc1"


def encode_notice(n: Notice) -> bytes:
    return _MAGIC + encode(n)


def decode_notice(data: bytes) -> Notice:
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(_MAGIC):
        raise WireError("notification: not a kvconnect notice")
    n = decode(bytes(data[len(_MAGIC):]), Notice, what="notification", max_bytes=4096)
    if n.kind not in NOTICE_KINDS or n.tp_size <= 0 or not 0 <= n.rank < n.tp_size:
        raise WireError(f"notification: bad notice {n!r}")
    return n


class WriteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Push mode, consumer -> producer over the side channel: write your blocks of
    ``producer_request_id`` into mine."""

    producer_request_id: str
    consumer_request_id: str
    consumer_engine_id: str
    consumer_host: str
    consumer_port: Port
    consumer_tp_size: Positive
    consumer_rank: NonNegative
    block_ids: Groups
    token_start: NonNegative
    token_end: NonNegative

    def __post_init__(self) -> None:  # msgspec reports these as the message's validation error
        if self.consumer_rank >= self.consumer_tp_size:
            raise ValueError(
                f"consumer_rank {self.consumer_rank} is not below consumer_tp_size {self.consumer_tp_size}"
            )
        if self.token_start > self.token_end:
            raise ValueError(f"token_start {self.token_start} is after token_end {self.token_end}")


# -- integrity (verify_checksums) -----------------------------------------------------------------
class ChecksumRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Consumer -> producer over the side channel: the checksums of ``request_id``'s KV."""

    request_id: str


class ChecksumReply(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per KV-cache group, the producer's :func:`kvconnect.integrity.token_head_sums` table of its
    leased blocks (every token they hold), as little-endian int64 ``[tokens, heads]`` bytes."""

    heads: int
    tables: tuple[bytes, ...]


def decode_checksum_reply(data: bytes) -> ChecksumReply:
    r = decode(data, ChecksumReply, what="checksum reply")
    if r.heads <= 0 or any(len(t) % (8 * r.heads) for t in r.tables):
        raise WireError(f"checksum reply: tables do not hold int64 [tokens, {r.heads}] rows")
    return r
