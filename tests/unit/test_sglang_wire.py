"""The SGLang adapter's pure parts: its wire messages and the enum extension. None need SGLang."""

from __future__ import annotations

import enum

import pytest

from kvconnect.adapters.sglang import wire as W
from kvconnect.adapters.sglang.plugin import add_enum_member
from kvconnect.errors import WireError
from kvconnect.metadata import encode


def _room(**kw):
    base = dict(
        version=W.WIRE_VERSION,
        room=7,
        engine_id="d0",
        side_host="127.0.0.1",
        side_port=5000,
        endpoint="127.0.0.1",
        dst_port=6000,
        kv_pages=W.pack_pages([5, 1, 9]),
    )
    return W.RoomRequest(**{**base, **kw})


def _ready(**kw):
    base = dict(
        version=W.WIRE_VERSION,
        room=7,
        engine_id="p0",
        side_host="127.0.0.1",
        side_port=5001,
        lease_id="7@d0",
        src_pages=W.pack_pages([1, 2]),
        dst_pages=W.pack_pages([8, 9]),
        aux_index=3,
        aux_rows=(b"\x01" * 4,),
    )
    return W.Ready(**{**base, **kw})


def test_room_and_ready_round_trip():
    back = W.parse(W.frames(W.KIND_ROOM, _room()))
    assert back == _room() and back.pages().tolist() == [5, 1, 9]
    assert W.parse(W.frames(W.KIND_READY, _ready())) == _ready()


@pytest.mark.parametrize(
    "msg, words",
    [
        ([W.MAGIC, W.KIND_ROOM], "3 frames"),
        ([W.MAGIC, b"NOPE", b""], "unknown kind"),
        ([W.MAGIC, W.KIND_ROOM, b"\xff\x00garbage"], "room request"),
        (W.frames(W.KIND_ROOM, _room(version=99)), "wire version 99"),
        (W.frames(W.KIND_READY, _ready(dst_pages=W.pack_pages([1]))), "2 source pages but 1"),
        ([W.MAGIC, W.KIND_READY, encode({"version": W.WIRE_VERSION, "room": 1, "bogus": 1})], "ready notice"),
    ],
)
def test_garbage_control_messages_raise_wire_errors(msg, words):
    with pytest.raises(WireError, match=words):
        W.parse(msg)


def test_negative_or_ragged_page_lists_are_refused():
    with pytest.raises(WireError, match="negative"):
        _room(kv_pages=W.pack_pages([-1])).pages()
    with pytest.raises(WireError, match="whole int32"):
        _room(kv_pages=b"\x01\x02").pages()


def test_added_enum_member_behaves_like_a_declared_one():
    class Backend(enum.Enum):
        A = "a"

    m = add_enum_member(Backend, "KV", "kv")
    assert Backend("kv") is m is Backend.KV is Backend["KV"]
    assert m in list(Backend) and m != Backend.A and m.value == "kv" and m.name == "KV"
    assert add_enum_member(Backend, "KV", "kv") is m  # idempotent
    with pytest.raises(ValueError, match="another value"):
        add_enum_member(Backend, "KV", "other")
