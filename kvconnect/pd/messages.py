"""What the P/D progress thread is told: its inbox messages (from the threads around it) and its
timers (set by itself). Each is a type of its own; :class:`~kvconnect.pd.loop.EventLoop`
dispatches by type, and :class:`~kvconnect.pd.progress.ProgressLoop` lists every handler in one
place. A message or timer that names a load or lease carries the object itself: by the time it
is handled, that load may have ended and another begun under the same request id, and the handler
checks that the one it names is still the one in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvconnect.errors import KVConnectError
from kvconnect.metadata import HandshakeMetadata
from kvconnect.pd import wire as W
from kvconnect.pd.peers import PeerKey
from kvconnect.pd.state import Lease, Load

# -- inbox messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepMeta:
    """Engine thread: this step's leases, loads, releases and aborts."""

    meta: W.PDStepMetadata


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """Control thread: a peer's handshake metadata, or why it could not be had."""

    key: PeerKey
    metadata: HandshakeMetadata | None
    error: KVConnectError | None


@dataclass(frozen=True, slots=True)
class WriteRequested:
    """Side-channel listener (producer, push): a consumer rank asks for a leased request's KV."""

    request: W.WriteRequest


@dataclass(frozen=True, slots=True)
class WriteSent:
    """Control thread (consumer, push): producer ``rank`` took ``load``'s write request, or not."""

    load: Load
    rank: int
    error: KVConnectError | None


@dataclass(frozen=True, slots=True)
class SumsAnswer:
    """Control thread (consumer, verify_checksums): producer ``rank``'s checksums for ``load``."""

    load: Load
    rank: int
    body: bytes | None
    error: KVConnectError | None


# -- timers -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadDeadline:
    """The load's handshake_timeout_s + transfer_timeout_s passed."""

    load: Load


@dataclass(frozen=True, slots=True)
class SumsRetry:
    """Ask producer ``rank`` again for checksums it did not hold yet."""

    load: Load
    rank: int


@dataclass(frozen=True, slots=True)
class LeaseDeadline:
    """The lease's lease_timeout_s passed: free its blocks, read or not."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class EarlyNoticesExpire:
    """``done`` notices that came before their lease are kept for lease_timeout_s at most."""

    request_id: str


@dataclass(frozen=True, slots=True)
class PendingWriteExpire:
    """A write request that came before its lease waited handshake_timeout_s: refuse it."""

    request: W.WriteRequest


@dataclass(frozen=True, slots=True)
class ServedSumsExpire:
    """A retired lease's checksums were served long enough for every consumer to have asked."""

    request_id: str
    data: bytes


#: Every type the progress thread's inbox takes (besides the loop's own ``Call``).
MESSAGES = (StepMeta, PeerAnswer, WriteRequested, WriteSent, SumsAnswer)
#: Every timer type it sets.
TIMERS = (LoadDeadline, SumsRetry, LeaseDeadline, EarlyNoticesExpire, PendingWriteExpire, ServedSumsExpire)
