"""The connector configuration: typed, validated once at start, every default in this file.

vLLM passes ``kv_connector_extra_config`` (a free dict); SGLang passes its own extra-config JSON.
Both reach :func:`parse_config`. Two shapes are accepted::

    {"backend": "nixl", "mode": "pull"}                          # one backend
    {"backends": [{"backend": "nixl"},                           # several, composed by the
                  {"backend": "cpu_offload", "cpu_bytes_to_use": 4e9}]}  # MultiConnector, in order

An unknown key is an error that names it and suggests the closest known key.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any, Literal, Union

import msgspec

from kvconnect.errors import ConfigError


class _Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class PDConfig(_Base, frozen=True):
    """Options shared by the P/D transfer backends (NIXL, MoRI-IO)."""

    #: ``pull``: the decode instance reads the prefill's blocks (NIXL READ / MoRI read).
    #: ``push``: the prefill instance writes into the decode's blocks once the decode has
    #: allocated them. ``read`` / ``write`` are accepted as MoRI-style aliases.
    mode: Literal["pull", "push", "read", "write"] = "pull"
    #: Host the side-channel listener binds to and advertises to peers (``*`` binds all, and then
    #: ``advertise_host`` is what peers are told). IPv4, IPv6 or a host name.
    side_channel_host: str = "127.0.0.1"
    #: Base TCP port of the side channel; TP rank r listens on ``base + r``.
    side_channel_port: int = 5600
    #: Address advertised in transfer params when it differs from the bind address.
    advertise_host: str | None = None
    #: Shared secret: when set, side-channel messages without a valid HMAC are rejected.
    secret: str | None = None
    #: Deadline for one handshake (connect, request, reply) with a peer.
    handshake_timeout_s: float = 10.0
    #: Deadline for one request's transfer, from its start to its last completed status.
    transfer_timeout_s: float = 60.0
    #: How long a producer holds blocks for a consumer that has not finished reading them.
    lease_timeout_s: float = 120.0
    #: Sleep between polls of the transport while transfers are in flight (never a hot spin).
    poll_interval_s: float = 0.0005
    #: Sleep between polls while nothing is in flight.
    idle_poll_interval_s: float = 0.02
    #: Producer checksums each block; consumer verifies before the engine uses it.
    verify_checksums: bool = False
    #: Merge contiguous block runs into single descriptors.
    merge_runs: bool = True

    @property
    def pull(self) -> bool:
        return self.mode in ("pull", "read")


class NixlConfig(PDConfig, frozen=True, tag="nixl", tag_field="backend"):
    """P/D transfer over NIXL."""

    #: NIXL transport plugins to instantiate.
    nixl_backends: tuple[str, ...] = ("UCX",)
    #: Run NIXL's own progress thread (spins a core; off by default, kvconnect polls).
    nixl_progress_thread: bool = False


class MoriConfig(PDConfig, frozen=True, tag="mori", tag_field="backend"):
    """P/D transfer over MoRI-IO RDMA."""

    #: Queue pairs per transfer and RDMA batching knobs handed to ``RdmaBackendConfig``
    #: (``post_batch_size`` -1: MoRI's default).
    qp_per_transfer: int = 1
    post_batch_size: int = -1
    num_worker_threads: int = 1
    #: How MoRI's completion-queue threads wait: ``polling`` (lowest latency) or ``event``.
    poll_cq_mode: Literal["polling", "event"] = "polling"
    #: Host the MoRI-IO engine and its notification socket bind and advertise (default: the
    #: side channel's advertised host).
    mori_host: str | None = None
    #: MoRI-IO engine port of TP rank 0 (rank r uses ``mori_port + r``); 0 picks a free port.
    mori_port: int = 0


class CpuOffloadConfig(_Base, frozen=True, tag="cpu_offload", tag_field="backend"):
    """Host-memory KV tier."""

    #: Host memory for the tier, in bytes (required). Split over TP ranks unless ``per_rank``.
    cpu_bytes_to_use: int
    #: Read ``cpu_bytes_to_use`` as per TP rank instead of in total.
    per_rank: bool = False
    #: ``lru`` or ``arc``.
    eviction_policy: Literal["lru", "arc"] = "lru"
    #: ``finish``: store a request's full blocks when it finishes; ``fill``: also as they fill.
    store_mode: Literal["finish", "fill"] = "finish"
    #: Folded into every prefix hash (isolates tenants sharing one tier).
    hash_salt: str = ""
    #: Checksum blocks when stored, verify when loaded.
    verify_checksums: bool = False
    #: Threads sharing each large copy when the KV caches live on the CPU (one cannot saturate
    #: the memory bus; more take cores from the forward pass). Unused on a GPU.
    copy_threads: int = 1


class MooncakeConfig(_Base, frozen=True, tag="mooncake", tag_field="backend"):
    """Shared KV tier on a Mooncake Store (``pip install kvconnect[mooncake]``): prefixes stored by
    any instance are served to every instance that uses the same master and namespace."""

    #: The Mooncake master's RPC address, ``host:port`` (required).
    master_server_address: str
    #: Where transfer-engine metadata lives: ``P2PHANDSHAKE`` or the master's HTTP metadata server
    #: (``http://host:port/metadata``). Must be the same on every party of the store.
    metadata_server: str = "P2PHANDSHAKE"
    #: The address this process's transfer engine advertises to the store.
    local_hostname: str = "127.0.0.1"
    #: ``tcp`` or ``rdma``.
    protocol: Literal["tcp", "rdma"] = "tcp"
    #: RDMA device names (``protocol="rdma"``), comma-separated; empty lets Mooncake choose.
    rdma_devices: str = ""
    #: Bytes of store memory this process contributes (0: objects live in memory holders,
    #: ``mooncake_client --global_segment_size=...``, which outlive engines).
    global_segment_size: int = 0
    #: Mooncake's local staging buffer (kvconnect moves bytes zero-copy and needs none).
    local_buffer_size: int = 0
    #: Names the deployment in every key instead of the model path (use the same value on every
    #: instance that should share; instances of different models must not share one).
    namespace: str = ""
    #: Folded into every prefix key (isolates tenants sharing one store).
    hash_salt: str = ""
    #: Replicas of each object in the store.
    replica_num: int = 1
    #: Deadline for connecting to the master at start (an unreachable master is a ConfigError).
    connect_timeout_s: float = 10.0
    #: A lookup not answered within this counts as a miss.
    lookup_timeout_s: float = 1.0
    #: A load not complete (and verified) within this fails (the engine's failure policy applies);
    #: a zero-copy load whose get is in flight then is reported when that call returns.
    load_timeout_s: float = 10.0
    #: A store not complete within this is dropped and counted.
    store_timeout_s: float = 30.0
    #: After a failed store call, lookups miss and stores are dropped for this long before the
    #: store is tried again (Mooncake reconnects to a restarted master by itself).
    retry_interval_s: float = 2.0
    #: Objects (blocks) per Mooncake batch call.
    batch_objects: int = 32
    #: KV caches the store cannot reach zero-copy (GPU memory) move through a registered host
    #: staging buffer: ``auto`` stages exactly those, ``always`` stages host caches too, ``never``
    #: refuses them at start.
    staging: Literal["auto", "always", "never"] = "auto"
    #: Bytes of that staging buffer (pinned on a GPU); it must hold two objects (blocks, every
    #: layer). A load or store larger than half of it moves in chunks.
    staging_buffer_bytes: int = 256 << 20


BackendConfig = Union[NixlConfig, MoriConfig, CpuOffloadConfig, MooncakeConfig]
BACKEND_TYPES: dict[str, type[_Base]] = {
    "nixl": NixlConfig,
    "mori": MoriConfig,
    "cpu_offload": CpuOffloadConfig,
    "mooncake": MooncakeConfig,
}
#: Backends that move KV between instances; a composition may hold at most one.
PD_BACKENDS = frozenset({"nixl", "mori"})


class KVConnectConfig(_Base, frozen=True):
    """The whole connector: backends in priority order (store to all)."""

    backends: tuple[BackendConfig, ...]
    #: A composition on a model whose KV-cache groups a child cannot serve (see DESIGN.md, hybrid
    #: row): ``fail`` the start naming the child and why, or ``skip`` that child (logged) and run
    #: with the others.
    unsupported_model: Literal["fail", "skip"] = "fail"
    #: Which child loads a prefix in a composition: ``first`` (the first child in order with any
    #: hit, vLLM's rule) or ``longest`` (every child is asked and the longest hit wins, the
    #: earlier child on a tie: a two-block host-tier hit does not hide a forty-block shared hit).
    load_rule: Literal["first", "longest"] = "first"

    @property
    def names(self) -> list[str]:
        return [backend_name(b) for b in self.backends]


def backend_name(cfg: Any) -> str:
    return type(cfg).__struct_config__.tag  # type: ignore[no-any-return]


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`(?: - at `([^`]*)`)?")
_INVALID_TAG = re.compile(r"Invalid value '([^']*)' - at `([^`]*)`")


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(path: str, raw: Mapping[str, Any]) -> list[str]:
    """Known keys of the struct at a msgspec error path like ``$.backends[1]``."""
    m = re.fullmatch(r"\$\.backends\[(\d+)\]", path or "")
    if m:
        entries = raw.get("backends") or []
        i = int(m.group(1))
        if i < len(entries) and isinstance(entries[i], Mapping):
            t = BACKEND_TYPES.get(entries[i].get("backend"))
            if t is not None:
                return list(t.__struct_fields__) + ["backend"]
    return ["backends", "unsupported_model", "load_rule"]


def parse_config(raw: Mapping[str, Any] | None) -> KVConnectConfig:
    """Validate a plain dict into a :class:`KVConnectConfig`, or raise ConfigError."""
    if raw is None or len(raw) == 0:
        raise ConfigError(
            "kvconnect needs a config naming its backend(s), e.g. "
            '{"backend": "nixl"} or {"backends": [{"backend": "nixl"}, '
            '{"backend": "cpu_offload", "cpu_bytes_to_use": 4000000000}]}'
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config must be an object, got {type(raw).__name__}")
    data = dict(raw)
    if "backend" in data and not isinstance(data["backend"], str):
        raise ConfigError(f"'backend' must be a backend name, got {data['backend']!r}")
    if "backends" in data and not isinstance(data["backends"], (list, tuple)):
        raise ConfigError(f"'backends' must be a list of backend objects, got {data['backends']!r}")
    if "backends" not in data:
        if "backend" not in data:
            raise ConfigError(
                "config needs 'backend' (one backend) or 'backends' (a list)"
                + _suggest(next(iter(data)), ["backend", "backends"])
            )
        top = {k: data.pop(k) for k in ("load_rule",) if k in data}
        data = {"backends": [data], **top}
    elif "backend" in data:
        raise ConfigError("config has both 'backend' and 'backends': give one of them")
    data["backends"] = [dict(e) if isinstance(e, Mapping) else e for e in data["backends"]]
    for i, entry in enumerate(data["backends"]):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"backends[{i}] must be an object with a 'backend' key, got {entry!r}")
        name = entry.get("backend")
        if not isinstance(name, str) or name not in BACKEND_TYPES:
            raise ConfigError(
                f"backends[{i}].backend: unknown backend {name!r}; known: {sorted(BACKEND_TYPES)}"
                + _suggest(str(name), list(BACKEND_TYPES))
            )
    # JSON has no integer/float split for sizes: accept 4e9 for byte counts.
    for entry in data.get("backends") or []:
        for key in ("cpu_bytes_to_use", "global_segment_size", "local_buffer_size"):
            if isinstance(entry, dict) and isinstance(entry.get(key), float):
                v = entry[key]
                if v.is_integer():
                    entry[key] = int(v)
    try:
        cfg = msgspec.convert(data, KVConnectConfig)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = _UNKNOWN_FIELD.search(msg)
        if m:
            key, path = m.group(1), m.group(2) or "$"
            raise ConfigError(
                f"unknown config key '{key}' at {path}" + _suggest(key, _fields_at(path, data))
            ) from e
        raise ConfigError(f"invalid config: {msg}") from e
    _validate(cfg)
    return cfg


def _validate(cfg: KVConnectConfig) -> None:
    if not cfg.backends:
        raise ConfigError("'backends' is empty: name at least one backend")
    pd = [n for n in cfg.names if n in PD_BACKENDS]
    if len(pd) > 1:
        raise ConfigError(
            f"backends {pd} are both P/D transfer backends: one engine has one P/D peer protocol "
            "(the router passes a single set of transfer params); keep one of them"
        )
    for i, b in enumerate(cfg.backends):
        where = f"backends[{i}] ({backend_name(b)})"
        if isinstance(b, PDConfig):
            for key in ("handshake_timeout_s", "transfer_timeout_s", "lease_timeout_s",
                        "poll_interval_s", "idle_poll_interval_s"):
                if not 0 < getattr(b, key) < math.inf:  # a deadline of inf (or nan) is no deadline
                    raise ConfigError(f"{where}.{key} must be > 0 and finite, got {getattr(b, key)}")
            if not 0 <= b.side_channel_port < 65536:
                raise ConfigError(f"{where}.side_channel_port {b.side_channel_port} is not a TCP port")
        if isinstance(b, MoriConfig):
            for key in ("qp_per_transfer", "num_worker_threads"):
                if getattr(b, key) < 1 and not (key == "num_worker_threads" and getattr(b, key) == -1):
                    raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(b, key)}")
            if b.post_batch_size == 0 or b.post_batch_size < -1:
                raise ConfigError(f"{where}.post_batch_size must be >= 1 or -1, got {b.post_batch_size}")
            if not 0 <= b.mori_port < 65536:
                raise ConfigError(f"{where}.mori_port {b.mori_port} is not a TCP port")
        if isinstance(b, CpuOffloadConfig):
            if b.cpu_bytes_to_use <= 0:
                raise ConfigError(f"{where}.cpu_bytes_to_use must be > 0, got {b.cpu_bytes_to_use}")
            if b.copy_threads <= 0:
                raise ConfigError(f"{where}.copy_threads must be > 0, got {b.copy_threads}")
        if isinstance(b, MooncakeConfig):
            validate_mooncake(b, where)


def validate_mooncake(b: MooncakeConfig, where: str = "mooncake") -> None:
    """Checks that need no store (the backend runs them too, for configs built directly)."""
    host, sep, port = b.master_server_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{where}.master_server_address must be 'host:port', got {b.master_server_address!r}"
        )
    md = b.metadata_server
    if md != "P2PHANDSHAKE" and not md.startswith(("http://", "etcd://", "redis://")):
        raise ConfigError(
            f"{where}.metadata_server must be 'P2PHANDSHAKE' or a metadata URL "
            f"(http://host:port/metadata), got {md!r}"
        )
    for key in ("connect_timeout_s", "lookup_timeout_s", "load_timeout_s", "store_timeout_s",
                "retry_interval_s"):
        if not getattr(b, key) > 0:
            raise ConfigError(f"{where}.{key} must be > 0, got {getattr(b, key)}")
    for key in ("global_segment_size", "local_buffer_size"):
        if getattr(b, key) < 0:
            raise ConfigError(f"{where}.{key} must be >= 0 bytes, got {getattr(b, key)}")
    for key in ("replica_num", "batch_objects"):
        if getattr(b, key) < 1:
            raise ConfigError(f"{where}.{key} must be >= 1, got {getattr(b, key)}")
    if b.staging_buffer_bytes <= 0:
        raise ConfigError(f"{where}.staging_buffer_bytes must be > 0 bytes, got {b.staging_buffer_bytes}")


def defaults_table() -> str:
    """Every option with its default, for ``kvconnect config``."""
    lines = ["[composition] (top level, next to 'backends')", "  load_rule = 'first'"]
    for name, t in BACKEND_TYPES.items():
        lines.append(f"[{name}]")
        for f, d in zip(t.__struct_fields__, _defaults(t)):
            lines.append(f"  {f} = {d!r}")
    return "\n".join(lines)


def _defaults(t: type[msgspec.Struct]) -> list[Any]:
    fields = t.__struct_fields__
    defaults = list(t.__struct_defaults__)
    pad = ["<required>"] * (len(fields) - len(defaults))
    return pad + defaults
