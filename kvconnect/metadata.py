"""Wire types: everything that crosses a process boundary, as msgspec Structs.

Input from outside (a peer's handshake, a router's transfer params) is decoded strictly: wrong
types, missing fields and oversize messages raise :class:`~kvconnect.errors.WireError` naming
the field. Decoders are built once per type and reused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import msgspec

from kvconnect.errors import WireError

#: Bumped whenever a wire type changes incompatibly; part of every compatibility hash.
PROTOCOL_VERSION = 1
#: Default ceiling for one decoded message (handshake metadata for a large model is ~MBs).
MAX_WIRE_BYTES = 64 * 1024 * 1024

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def decode(data: bytes, type_: type[T], *, what: str, max_bytes: int = MAX_WIRE_BYTES) -> T:
    """Strictly decode msgpack ``data`` as ``type_``; errors name ``what`` and the bad field."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireError(f"{what}: message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as e:
        raise WireError(f"{what}: {e}") from e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise WireError(f"{what}: not a valid message ({e})") from e


def convert(obj: Any, type_: type[T], *, what: str) -> T:
    """Strictly convert a plain Python object (e.g. a JSON dict) to ``type_``."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as e:
        raise WireError(f"{what}: {e}") from e


def as_struct(obj: Any, type_: type[T], *, what: str) -> T:
    """``obj`` as ``type_``: decoded from msgpack bytes, converted from a dict (an engine may pass
    handshake metadata either way), or already one; anything else is a WireError naming ``what``."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        obj = decode(bytes(obj), type_, what=what)
    elif isinstance(obj, Mapping):
        obj = convert(dict(obj), type_, what=what)
    if not isinstance(obj, type_):
        raise WireError(f"{what}: unexpected {type(obj).__name__}")
    return obj


def compat_hash(signature: Mapping[str, Any]) -> str:
    """Stable hash over what two peers must agree on to exchange KV (model shape, dtype,
    layout kind, protocol version). Order of keys does not matter."""
    canonical = msgspec.json.encode({"protocol": PROTOCOL_VERSION, **dict(signature)}, order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:32]


#: Bounds checked in C where a peer's bytes are decoded.
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(gt=0, lt=65536)]


class LayerRegion(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One registered KV tensor as a peer sees it."""

    name: str
    base_addr: NonNegative
    dims: tuple[str, ...]
    shape: tuple[NonNegative, ...]
    strides: tuple[int, ...]
    itemsize: Positive
    dtype: str
    group: NonNegative = 0

    def __post_init__(self) -> None:
        if not len(self.dims) == len(self.shape) == len(self.strides):
            raise WireError(f"layer {self.name!r}: {len(self.dims)} dims, {len(self.shape)} sizes and "
                             f"{len(self.strides)} strides")


class HandshakeMetadata(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a worker publishes about itself on the side channel."""

    engine_id: str
    tp_rank: NonNegative
    tp_size: Positive
    #: :func:`compat_hash` of the model/layout signature; peers refuse a mismatch.
    compat_hash: str
    #: Tokens per block, per KV-cache group.
    block_sizes: tuple[Positive, ...]
    layers: tuple[LayerRegion, ...]
    #: Which transport the opaque blob belongs to ("nixl", "mori").
    transport: str
    #: The transport's own metadata (NIXL agent metadata, a packed MoRI EngineDesc).
    transport_metadata: bytes
    #: Transport-level name of this worker (NIXL agent name, MoRI engine key).
    agent_name: str
    kvconnect_version: str = ""

    def __post_init__(self) -> None:
        if self.tp_rank >= self.tp_size:
            raise WireError(f"tp_rank {self.tp_rank} is not below tp_size {self.tp_size}")


class KVTransferParams(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """vLLM's P/D ``kv_transfer_params`` protocol (the keys routers pass between instances).

    Unknown keys are ignored so that routers and newer vLLM versions can add their own; the
    known keys are type-checked and a wrong type names the key."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    #: One list per KV-cache group; vLLM sends a flat list for single-group models. Kept as the
    #: router's list, elements unchecked here: the worker turns them into descriptor indices with
    #: one numpy conversion, which checks every id (type and range, against the producer's cache)
    #: and fails the load naming them (:func:`kvconnect.pd.plan`), so a pass here would repeat it.
    remote_block_ids: Any = None
    remote_host: str | None = None
    remote_port: Port | None = None
    remote_request_id: str | None = None
    tp_size: int | None = None
    #: kvconnect extras (ignored by routers): producer block size and push-mode flag.
    remote_block_size: int | None = None
    kvconnect_mode: str | None = None


def parse_transfer_params(params: Mapping[str, Any] | None) -> KVTransferParams | None:
    """Validate a router's ``kv_transfer_params`` dict; None stays None."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise WireError(f"kv_transfer_params: expected an object, got {type(params).__name__}")
    try:  # msgspec checks every field in C, ids and port ranges included
        p = msgspec.convert(params if type(params) is dict else dict(params), KVTransferParams)
    except msgspec.ValidationError as e:
        raise WireError(f"kv_transfer_params: {e}") from e
    if p.do_remote_prefill:
        if (
            p.remote_engine_id is None
            or p.remote_block_ids is None
            or p.remote_host is None
            or p.remote_port is None
        ):
            missing = [k for k in ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")
                       if getattr(p, k) is None]
            raise WireError(f"kv_transfer_params: do_remote_prefill needs {', '.join(missing)}")
        ids = p.remote_block_ids
        if type(ids) is not list:
            raise WireError(f"kv_transfer_params: remote_block_ids must be a list of block ids (or one list "
                            f"per KV-cache group), got {type(ids).__name__}")
        if ids and type(ids[0]) is list and not all(type(g) is list for g in ids):
            raise WireError("kv_transfer_params: remote_block_ids mixes ids and per-group lists")
    elif p.remote_block_ids is not None and type(p.remote_block_ids) is not list:
        raise WireError(
            f"kv_transfer_params: remote_block_ids must be a list, got {type(p.remote_block_ids).__name__}"
        )
    return p


def block_groups(ids: list[int | list[int]] | None) -> tuple[list[int], ...]:
    """Normalise vLLM's flat (single group) or nested (per group) block id lists, per group.
    The lists are the caller's, not copies (decoded params are never mutated)."""
    if not ids:
        return ([],)
    if type(ids[0]) is list:
        return tuple(ids)  # type: ignore[arg-type]
    return (ids,)  # type: ignore[return-value]
