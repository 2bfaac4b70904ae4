"""What kvconnect's SGLang backend sends on SGLang's own ZMQ sockets, beside SGLang's messages.

SGLang owns the control plane: the bootstrap server tells a decode rank where each prefill rank's
ZMQ socket is, and the Common classes carry terminal statuses and aborts. kvconnect adds two
messages, each a multipart ``[MAGIC, kind, msgpack body]``:

``ROOM``   decode to prefill, once per request: the decode page indices the request's KV goes to,
           the metadata slot for its first output token, and where the decode rank's P/D side
           channel listens (kvconnect.pd's handshake, write requests).
``READY``  prefill to decode, once the request's last chunk was computed: the prefill rank leased
           the pages (:mod:`kvconnect.pd`), here is where and under which id; plus the request's
           metadata rows. The decode rank then loads them with kvconnect.pd's push protocol.

Both are decoded strictly (:func:`kvconnect.metadata.decode`): a malformed frame raises
:class:`~kvconnect.errors.WireError` naming the field, and is dropped without touching any state.
"""

from __future__ import annotations

import msgspec
import numpy as np

from kvconnect.errors import WireError
from kvconnect.metadata import decode, encode

#: First frame of every kvconnect message (foreign traffic on the socket is told apart by it).
MAGIC = b"KVCONNECT-SGL"
KIND_ROOM = b"ROOM"
#: SGLang sends every receiver's registration message to the prefill ranks; ours says nothing (the
#: P/D core handshakes on first contact) and is ignored.
HELLO = [MAGIC, b"HELLO", b""]
KIND_READY = b"READY"
#: Tag of the prefill-to-decode status message (``CommonKVManager.kv_status_msg_tag``).
STATUS_TAG = b"KVCONNECT-STATUS"
#: Bumped when a message changes incompatibly; a peer with another version is refused.
WIRE_VERSION = 2


class RoomRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where one request's KV goes on one decode rank."""

    version: int
    room: int
    #: The decode rank's P/D engine id and side channel (``kvconnect.pd``).
    engine_id: str
    side_host: str
    side_port: int
    #: Decode rank's ZMQ endpoint (SGLang's Common classes send statuses to ``endpoint:dst_port``).
    endpoint: str
    dst_port: int
    #: Decode page indices, int32 little-endian (empty for a dummy rank).
    kv_pages: bytes = b""
    aux_index: int | None = None
    required_dst_info_num: int = 1
    decode_prefix_len: int = 0
    is_dummy: bool = False

    @property
    def agent_name(self) -> str:
        """Key of this decode rank in SGLang's ``transfer_infos``."""
        return self.engine_id

    def pages(self) -> np.ndarray:
        return unpack_pages(self.kv_pages, f"room {self.room}")


class Ready(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prefill to decode: the request's KV is leased under ``lease_id``; load ``dst_pages`` from it."""

    version: int
    room: int
    #: The prefill rank's P/D engine id and side channel.
    engine_id: str
    side_host: str
    side_port: int
    lease_id: str
    #: Prefill pages (int32 LE) of the lease and the decode pages they go to, pairwise.
    src_pages: bytes
    dst_pages: bytes
    #: The request's metadata rows (first output token, logprobs, ...), one per aux buffer, for
    #: the decode's slot ``aux_index``.
    aux_index: int | None = None
    aux_rows: tuple[bytes, ...] = ()


def lease_id(room: int, decode_engine_id: str) -> str:
    """The P/D core's id for the lease of ``room``'s pages towards one decode rank."""
    return f"{room}@{decode_engine_id}"


def pack_pages(pages) -> bytes:
    return np.ascontiguousarray(np.asarray(pages), dtype="<i4").tobytes()


def unpack_pages(raw: bytes, what: str) -> np.ndarray:
    if len(raw) % 4:
        raise WireError(f"{what}: page list is {len(raw)} bytes, not whole int32s")
    pages = np.frombuffer(raw, dtype="<i4").astype(np.int64)
    if pages.size and pages.min() < 0:
        raise WireError(f"{what}: page list has a negative page index")
    return pages


def frames(kind: bytes, body: msgspec.Struct) -> list[bytes]:
    return [MAGIC, kind, encode(body)]


def is_ours(msg: list[bytes]) -> bool:
    return len(msg) >= 1 and msg[0] == MAGIC


def parse(msg: list[bytes]) -> RoomRequest | Ready:
    """Decode one of our multipart messages, or raise WireError saying what is wrong."""
    if len(msg) != 3 or msg[0] != MAGIC:
        raise WireError(f"kvconnect control message: expected 3 frames starting {MAGIC!r}, got {len(msg)}")
    kind, body = msg[1], msg[2]
    types = {
        KIND_ROOM: (RoomRequest, "kvconnect room request"),
        KIND_READY: (Ready, "kvconnect ready notice"),
    }
    if kind not in types:
        raise WireError(f"kvconnect control message: unknown kind {kind[:16]!r}")
    cls, what = types[kind]
    obj = decode(body, cls, what=what)
    if obj.version != WIRE_VERSION:
        raise WireError(
            f"{what}: wire version {obj.version} from {obj.engine_id!r}, this side speaks "
            f"{WIRE_VERSION}: run the same kvconnect version on prefill and decode"
        )
    if isinstance(obj, Ready):
        src, dst = unpack_pages(obj.src_pages, what), unpack_pages(obj.dst_pages, what)
        if len(src) != len(dst):
            raise WireError(f"{what}: {len(src)} source pages but {len(dst)} destination pages")
    return obj
