"""Every error kvconnect raises on purpose derives from KVConnectError, so callers can tell
kvconnect's clear refusals apart from bugs."""


class KVConnectError(Exception):
    """Base class of kvconnect's own errors."""


class ConfigError(KVConnectError, ValueError):
    """The connector configuration is invalid; the message names the offending key."""


class UnsupportedModelError(ConfigError):
    """A backend cannot serve this model's KV-cache groups (an attention kind or a group layout
    it does not handle); the message says which group and why."""


class LayoutError(KVConnectError, ValueError):
    """A KV cache tensor or block list does not fit the described layout."""


class WireError(KVConnectError, ValueError):
    """Bytes or a dict from another process (handshake, transfer params) failed validation."""


class HandshakeError(KVConnectError):
    """The side-channel exchange with a peer failed: unreachable, timed out, refused or garbled."""


class PeerRefusedError(HandshakeError):
    """The peer answered, refusing the request: it did not act on it (unlike a timeout, after
    which the peer may or may not have)."""


class CompatibilityError(HandshakeError):
    """The peer's model/layout compatibility hash differs from ours: its KV cannot be used."""


class TransferError(KVConnectError):
    """A KV transfer failed or ran past its deadline."""


class BackendUnavailableError(KVConnectError, ImportError):
    """A selected backend needs a package that is not installed; the message says how to install it."""


class BenchmarkError(KVConnectError):
    """A benchmark run went wrong (a transfer failed or timed out, bytes differ after a round trip,
    a server could not be reset): its figures would be wrong, so it stops, saying what happened."""
