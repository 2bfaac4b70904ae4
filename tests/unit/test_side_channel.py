import socket
import time

import msgspec
import pytest
import zmq

from kvconnect.errors import HandshakeError, WireError
from kvconnect.handshake import (
    Request,
    SideChannelClient,
    SideChannelServer,
    Signed,
    zmq_endpoint,
)
from kvconnect.metadata import encode
from kvconnect.testing.ports import free_port

pytestmark = pytest.mark.unit


def _bad_handler(body: bytes) -> bytes:
    raise WireError("body is not a rank")


@pytest.fixture
def server():
    srv = SideChannelServer("127.0.0.1", 0, {"echo": lambda b: b[::-1], "bad": _bad_handler})
    yield srv
    srv.close()


def test_request_gets_its_reply(server):
    c = SideChannelClient()
    assert c.request("127.0.0.1", server.port, "echo", b"abc", timeout_s=5) == b"cba"
    assert c.request("127.0.0.1", server.port, "echo", b"xy", timeout_s=5) == b"yx"  # socket reused
    c.close()


def test_unknown_kind_and_handler_error_are_clear_refusals(server):
    c = SideChannelClient()
    with pytest.raises(HandshakeError, match="unknown request kind 'nope'"):
        c.request("127.0.0.1", server.port, "nope", timeout_s=5)
    with pytest.raises(HandshakeError, match="body is not a rank"):
        c.request("127.0.0.1", server.port, "bad", timeout_s=5)
    c.close()


def test_listener_down_times_out_within_the_deadline():
    port = free_port()  # nothing listens there
    c = SideChannelClient()
    t0 = time.monotonic()
    with pytest.raises(HandshakeError, match="no reply"):
        c.request("127.0.0.1", port, "echo", b"x", timeout_s=0.3)
    assert time.monotonic() - t0 < 2.0
    c.close()


def test_listener_survives_garbage_and_keeps_serving(server):
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(zmq_endpoint("127.0.0.1", server.port))
    for junk in (b"", b"\xff\xfe garbage", msgspec.msgpack.encode({"payload": 3}),
                 encode(Signed(b"not a request"))):
        raw.send(junk)
    raw.send_multipart([b"a", b"b", b"c"])
    deadline = time.monotonic() + 5
    while server.stats["rejected_garbage"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    raw.close()
    assert server.stats["rejected_garbage"] >= 4
    c = SideChannelClient()
    assert c.request("127.0.0.1", server.port, "echo", b"ok", timeout_s=5) == b"ko"
    c.close()


def test_with_a_secret_a_client_without_it_gets_nothing():
    srv = SideChannelServer("127.0.0.1", 0, {"metadata": lambda b: b"SECRET-METADATA"}, secret="s3cret")
    try:
        intruder = SideChannelClient()
        with pytest.raises(HandshakeError, match="no reply"):
            intruder.request("127.0.0.1", srv.port, "metadata", timeout_s=0.3)
        wrong = SideChannelClient(secret="guess")
        with pytest.raises(HandshakeError, match="no reply"):
            wrong.request("127.0.0.1", srv.port, "metadata", timeout_s=0.3)
        assert srv.stats["rejected_auth"] == 2
        friend = SideChannelClient(secret="s3cret")
        assert friend.request("127.0.0.1", srv.port, "metadata", timeout_s=5) == b"SECRET-METADATA"
        for c in (intruder, wrong, friend):
            c.close()
    finally:
        srv.close()


def test_client_with_secret_refuses_an_unsigned_reply():
    srv = SideChannelServer("127.0.0.1", 0, {"metadata": lambda b: b"forged"})  # no secret
    try:
        c = SideChannelClient(secret="s3cret")
        with pytest.raises(HandshakeError, match="HMAC"):
            c.request("127.0.0.1", srv.port, "metadata", timeout_s=5)
        c.close()
    finally:
        srv.close()


def test_a_stale_reply_is_never_taken_for_the_next_one():
    slow_calls = []

    def slow(body: bytes) -> bytes:
        slow_calls.append(body)
        if body == b"first":
            time.sleep(0.5)
        return body

    srv = SideChannelServer("127.0.0.1", 0, {"slow": slow})
    try:
        c = SideChannelClient()
        with pytest.raises(HandshakeError):
            c.request("127.0.0.1", srv.port, "slow", b"first", timeout_s=0.1)
        assert c.request("127.0.0.1", srv.port, "slow", b"second", timeout_s=5) == b"second"
        c.close()
    finally:
        srv.close()


def test_listener_binds_only_the_configured_host():
    srv = SideChannelServer("127.0.0.1", 0, {"echo": lambda b: b})
    try:
        with socket.socket() as s:  # the port is taken on loopback...
            with pytest.raises(OSError):
                s.bind(("127.0.0.1", srv.port))
        # ...but not on every address: another host address can still bind it
        with socket.socket() as s:
            s.bind(("127.0.0.2", srv.port))
    finally:
        srv.close()


def test_port_in_use_is_a_clear_error():
    srv = SideChannelServer("127.0.0.1", 0, {})
    try:
        with pytest.raises(HandshakeError, match="cannot listen"):
            SideChannelServer("127.0.0.1", srv.port, {})
    finally:
        srv.close()


def test_ipv6_loopback_works_where_available():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        srv = SideChannelServer("::1", 0, {"echo": lambda b: b})
    except HandshakeError:
        pytest.skip("IPv6 loopback not configured")
    try:
        c = SideChannelClient()
        assert c.request("::1", srv.port, "echo", b"v6", timeout_s=5) == b"v6"
        c.close()
    finally:
        srv.close()


def test_zmq_endpoints_bracket_ipv6():
    assert zmq_endpoint("::1", 5) == "tcp://[::1]:5"
    assert zmq_endpoint("10.1.2.3", 5) == "tcp://10.1.2.3:5"
    assert zmq_endpoint("*", 5) == "tcp://*:5"


def test_request_struct_rejects_unknown_fields():
    from kvconnect.metadata import decode

    with pytest.raises(WireError):
        decode(msgspec.msgpack.encode({"kind": "x", "nonce": b"1", "evil": 1}), Request, what="req")
