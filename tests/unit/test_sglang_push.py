"""The SGLang adapter's pure parts (page plans, wire messages, enum extension) and its push loop
over kvconnect's NIXL transport with the fake NIXL agent. None of these need SGLang."""

from __future__ import annotations

import enum
import threading

import numpy as np
import pytest

from kvconnect.adapters.sglang import plan
from kvconnect.adapters.sglang import wire as W
from kvconnect.adapters.sglang.plugin import add_enum_member
from kvconnect.adapters.sglang.push import PushLoop
from kvconnect.backends.nixl import NixlTransport
from kvconnect.errors import LayoutError, WireError
from tests.fakes import fake_nixl

DEADLINE_S = 10.0


# -- plan ----------------------------------------------------------------------------------------------
def test_write_descs_merge_runs_consecutive_on_both_sides_per_buffer():
    local, remote = plan.write_descs([3, 4, 5, 9], [10, 11, 12, 2], [100, 40])
    assert local.tolist() == [[0, 300, 300], [0, 900, 100], [1, 120, 120], [1, 360, 40]]
    assert remote.tolist() == [[0, 1000, 300], [0, 200, 100], [1, 400, 120], [1, 80, 40]]


def test_write_descs_refuse_pages_outside_either_pool():
    with pytest.raises(LayoutError, match="destination page index 8"):
        plan.write_descs([1], [8], [16], src_num_pages=[4], dst_num_pages=[8])
    with pytest.raises(LayoutError, match="2 source pages but 1"):
        plan.write_descs([1, 2], [3], [16])


def test_write_descs_of_no_pages_is_empty():
    local, remote = plan.write_descs([], [], [16, 16])
    assert local.shape == remote.shape == (0, 3)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"remote_page_size": 16}, "page size"),
        ({"remote_tp": 2}, "attention TP"),
        ({"remote_item_lens": [64]}, "KV buffers"),
        ({"remote_item_lens": [64, 32]}, "KV buffer 1"),
        ({"remote_dtype": "bfloat16"}, "dtype"),
    ],
)
def test_pool_mismatch_names_what_differs(change, words):
    base = dict(local_item_lens=[64, 64], remote_item_lens=[64, 64], local_page_size=1, remote_page_size=1,
                local_tp=1, remote_tp=1, is_mla=False, local_dtype="float16", remote_dtype="float16")
    assert plan.pool_mismatch(**base) is None
    assert words in plan.pool_mismatch(**{**base, **change})


def test_pool_mismatch_allows_other_tp_for_mla():
    assert plan.pool_mismatch(local_item_lens=[8], remote_item_lens=[8], local_page_size=1, remote_page_size=1,
                              local_tp=1, remote_tp=4, is_mla=True) is None


# -- wire ----------------------------------------------------------------------------------------------
def _reg(**kw):
    base = dict(version=W.WIRE_VERSION, agent_name="d0", endpoint="127.0.0.1", port=5000, transport="nixl",
                transport_metadata=b"md", kv_regions=((4096, 1024),), kv_item_lens=(64,), aux_regions=(),
                aux_item_lens=(), page_size=1, attn_tp_size=1, engine_rank=0, is_mla=False)
    return W.PeerRegistration(**{**base, **kw})


def test_room_request_round_trips_its_pages():
    req = W.RoomRequest(room=7, agent_name="d0", endpoint="h", dst_port=1, kv_pages=W.pack_pages([5, 1, 9]))
    back = W.parse(W.frames(W.KIND_ROOM, req))
    assert back == req and back.pages().tolist() == [5, 1, 9]


@pytest.mark.parametrize(
    "msg, words",
    [
        ([W.MAGIC, b"REG"], "3 frames"),
        ([W.MAGIC, b"NOPE", b""], "unknown kind"),
        ([W.MAGIC, W.KIND_ROOM, b"\xff\x00garbage"], "room request"),
        (W.frames(W.KIND_REGISTER, _reg(version=99)), "wire version 99"),
        (W.frames(W.KIND_REGISTER, _reg(kv_item_lens=(64, 64))), "differ in length"),
    ],
)
def test_garbage_control_messages_raise_wire_errors(msg, words):
    with pytest.raises(WireError, match=words):
        W.parse(msg)


def test_negative_or_ragged_page_lists_are_refused():
    with pytest.raises(WireError, match="negative"):
        W.RoomRequest(room=1, agent_name="a", endpoint="h", dst_port=1, kv_pages=W.pack_pages([-1])).pages()
    with pytest.raises(WireError, match="whole int32"):
        W.RoomRequest(room=1, agent_name="a", endpoint="h", dst_port=1, kv_pages=b"\x01\x02").pages()


# -- enum extension ------------------------------------------------------------------------------------
def test_added_enum_member_behaves_like_a_declared_one():
    class Backend(enum.Enum):
        A = "a"

    m = add_enum_member(Backend, "KV", "kv")
    assert Backend("kv") is m is Backend.KV is Backend["KV"]
    assert m in list(Backend) and m != Backend.A and m.value == "kv" and m.name == "KV"
    assert add_enum_member(Backend, "KV", "kv") is m  # idempotent
    with pytest.raises(ValueError, match="another value"):
        add_enum_member(Backend, "KV", "other")


# -- push loop over the fake NIXL agent ----------------------------------------------------------------
class _Side:
    def __init__(self, name: str, nbytes: int, fill: int) -> None:
        self.buf = np.full(nbytes, fill, dtype=np.uint8)
        self.t = NixlTransport(name, agent_factory=fake_nixl.nixl_agent, config_factory=fake_nixl.nixl_agent_config)
        self.t.register([(self.buf.ctypes.data, nbytes)])
        self.agent = self.t.agent


def _wait(ev: threading.Event) -> None:
    assert ev.wait(DEADLINE_S), "no callback before the deadline"


def _loaded(loop: PushLoop, target: _Side) -> str:
    got: dict = {}
    ev = threading.Event()

    def done(handle, err):
        got.update(handle=handle, err=err)
        ev.set()

    loop.add_peer(target.t.metadata(), [(target.buf.ctypes.data, target.buf.nbytes)], done)
    _wait(ev)
    assert got["err"] is None
    return got["handle"]


@pytest.fixture
def sides():
    src, dst = _Side("sgl-src", 4096, 7), _Side("sgl-dst", 4096, 0)
    active = threading.Event()
    yield src, dst, active
    for s in (src, dst):
        s.t.close()


def test_push_loop_writes_pages_and_reports_success(sides):
    src, dst, _ = sides
    src.buf[:] = np.arange(4096) % 251
    # the target must be progressed (no progress thread): a second loop does it, as on decode
    target_loop = PushLoop(dst.t, poll_interval_s=0.001, timeout_s=5, target_active=lambda: True)
    loop = PushLoop(src.t, poll_interval_s=0.001, timeout_s=5)
    try:
        peer = _loaded(loop, dst)
        local, remote = plan.write_descs([0, 1, 5], [2, 3, 0], [256])
        ev, got = threading.Event(), []
        loop.write(peer, local, remote, lambda err: (got.append(err), ev.set()))
        _wait(ev)
        assert got == [None]
        for s, d in ((0, 2), (1, 3), (5, 0)):
            assert dst.buf[d * 256:(d + 1) * 256].tobytes() == src.buf[s * 256:(s + 1) * 256].tobytes()
        assert not dst.buf[4 * 256:].any()
        assert loop.stats["writes"] == 1 and loop.stats["bytes"] == 768
    finally:
        loop.close()
        target_loop.close()


def test_push_loop_fails_a_write_whose_target_stopped_at_the_deadline(sides):
    src, dst, _ = sides
    loop = PushLoop(src.t, poll_interval_s=0.001, timeout_s=0.3)
    try:
        peer = _loaded(loop, dst)
        dst.agent.stop()
        ev, got = threading.Event(), []
        local, remote = plan.write_descs([0], [0], [256])
        loop.write(peer, local, remote, lambda err: (got.append(err), ev.set()))
        _wait(ev)
        assert "did not finish within 0.3s" in got[0]
        assert loop.stats["timed_out"] == 1
    finally:
        dst.agent.resume()
        loop.close()


def test_push_loop_fails_a_write_to_a_dead_peer(sides):
    src, dst, _ = sides
    loop = PushLoop(src.t, poll_interval_s=0.001, timeout_s=5)
    try:
        peer = _loaded(loop, dst)
        dst.agent.kill()
        ev, got = threading.Event(), []
        local, remote = plan.write_descs([0], [0], [256])
        loop.write(peer, local, remote, lambda err: (got.append(err), ev.set()))
        _wait(ev)
        assert got[0] is not None and peer in got[0]
    finally:
        loop.close()


def test_push_loop_reports_garbage_peer_metadata_as_an_error(sides):
    src, _, _ = sides
    loop = PushLoop(src.t, poll_interval_s=0.001, timeout_s=5)
    try:
        got, ev = {}, threading.Event()
        loop.add_peer(b"garbage", [(0, 1)], lambda h, e: (got.update(h=h, e=e), ev.set()))
        _wait(ev)
        assert got["h"] is None and "metadata" in got["e"]
    finally:
        loop.close()
