"""What kvconnect's SGLang backend sends between a decode rank and a prefill rank.

SGLang owns the control plane: the bootstrap server tells a decode rank where each prefill rank's
ZMQ socket is, and the Common classes send terminal statuses back. kvconnect adds two messages on
that socket, decode to prefill, each a multipart ``[MAGIC, kind, msgpack body]``:

``REG``  once per (decode rank, prefill rank): the decode rank's transfer-engine metadata and the
         memory regions prefill may write (KV buffers, then metadata buffers), with item sizes.
``ROOM`` once per request: the decode page indices prefill writes the request's KV to, and the
         metadata slot for its first output token.

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
KIND_REGISTER = b"REG"
KIND_ROOM = b"ROOM"
#: Tag of the prefill-to-decode status message (``CommonKVManager.kv_status_msg_tag``).
STATUS_TAG = b"KVCONNECT-STATUS"
#: Bumped when a message changes incompatibly; a peer with another version is refused.
WIRE_VERSION = 1

Region = tuple[int, int]


class PeerRegistration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A decode rank, as a prefill rank needs to know it to write into its memory."""

    version: int
    agent_name: str
    #: Decode rank's ZMQ endpoint (where prefill sends statuses).
    endpoint: str
    port: int
    transport: str
    transport_metadata: bytes
    #: ``(address, nbytes)`` of each KV buffer (one per layer and K/V plane, SGLang's order).
    kv_regions: tuple[Region, ...]
    #: Bytes of one page in each KV buffer.
    kv_item_lens: tuple[int, ...]
    aux_regions: tuple[Region, ...]
    aux_item_lens: tuple[int, ...]
    page_size: int
    attn_tp_size: int
    engine_rank: int
    is_mla: bool
    kv_cache_dtype: str = ""


class RoomRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where one request's KV goes on one decode rank."""

    room: int
    agent_name: str
    #: Decode rank's ZMQ endpoint (SGLang's Common classes send statuses to ``endpoint:dst_port``).
    endpoint: str
    dst_port: int
    #: Decode page indices, int32 little-endian (empty for a dummy rank).
    kv_pages: bytes = b""
    aux_index: int | None = None
    required_dst_info_num: int = 1
    decode_prefix_len: int = 0
    is_dummy: bool = False

    def pages(self) -> np.ndarray:
        if len(self.kv_pages) % 4:
            raise WireError(f"room {self.room}: kv_pages is {len(self.kv_pages)} bytes, not whole int32s")
        pages = np.frombuffer(self.kv_pages, dtype="<i4").astype(np.int64)
        if pages.size and pages.min() < 0:
            raise WireError(f"room {self.room}: kv_pages has a negative page index")
        return pages


def pack_pages(pages) -> bytes:
    return np.ascontiguousarray(np.asarray(pages), dtype="<i4").tobytes()


def frames(kind: bytes, body: msgspec.Struct) -> list[bytes]:
    return [MAGIC, kind, encode(body)]


def is_ours(msg: list[bytes]) -> bool:
    return len(msg) >= 1 and msg[0] == MAGIC


def parse(msg: list[bytes]) -> PeerRegistration | RoomRequest:
    """Decode one of our multipart messages, or raise WireError saying what is wrong."""
    if len(msg) != 3 or msg[0] != MAGIC:
        raise WireError(f"kvconnect control message: expected 3 frames starting {MAGIC!r}, got {len(msg)}")
    kind, body = msg[1], msg[2]
    if kind == KIND_REGISTER:
        reg = decode(body, PeerRegistration, what="kvconnect peer registration")
        if reg.version != WIRE_VERSION:
            raise WireError(
                f"kvconnect peer registration: wire version {reg.version} from {reg.agent_name!r}, "
                f"this side speaks {WIRE_VERSION}: run the same kvconnect version on prefill and decode"
            )
        if len(reg.kv_item_lens) != len(reg.kv_regions) or len(reg.aux_item_lens) != len(reg.aux_regions):
            raise WireError("kvconnect peer registration: item_lens and regions differ in length")
        return reg
    if kind == KIND_ROOM:
        return decode(body, RoomRequest, what="kvconnect room request")
    raise WireError(f"kvconnect control message: unknown kind {kind[:16]!r}")
