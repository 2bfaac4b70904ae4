"""Side-channel security on the P/D worker's real listener: it binds only the configured host; with
a ``secret`` in PDConfig an unauthenticated client gets nothing (and is counted), an
authenticated peer is served, and a P/D pair sharing the secret moves KV."""

from __future__ import annotations

import socket

import pytest

from kvconnect.errors import HandshakeError
from kvconnect.handshake import SideChannelClient
from kvconnect.metadata import encode
from kvconnect.pd import wire as W
from tests.unit.pd_harness import (
    assert_transferred,
    decode_start,
    prefill,
    run_until,
)

pytestmark = pytest.mark.unit
SECRET = "pd-s3cret"




def test_unauthenticated_metadata_fetch_gets_nothing_and_is_counted(engines):
    P = engines("prefill", options={"secret": SECRET})
    w = P.workers[0]
    for client in (SideChannelClient(), SideChannelClient(secret="guess")):
        try:
            with pytest.raises(HandshakeError, match="no reply"):
                client.request("127.0.0.1", w.port, "metadata", timeout_s=0.3)
            with pytest.raises(HandshakeError, match="no reply"):
                client.request("127.0.0.1", w.port, "checksums",
                               encode(W.ChecksumRequest(request_id="x")), timeout_s=0.3)
        finally:
            client.close()
    assert w.side_channel_stats["rejected_auth"] == 4
    assert w.side_channel_stats["requests"] == 0
    friend = SideChannelClient(secret=SECRET)
    try:
        assert friend.request("127.0.0.1", w.port, "metadata", timeout_s=5) == w._md_bytes
    finally:
        friend.close()
    assert w.side_channel_stats["requests"] == 1


def test_unauthenticated_write_request_is_never_acted_on(engines):
    P = engines("prefill", mode="push", options={"secret": SECRET})
    w = P.workers[0]
    body = encode(W.WriteRequest(producer_request_id="p", consumer_request_id="d", consumer_engine_id="evil",
                                 consumer_host="127.0.0.1", consumer_port=1, consumer_tp_size=1,
                                 consumer_rank=0, block_ids=((1,),), token_start=0, token_end=16))
    c = SideChannelClient()
    try:
        with pytest.raises(HandshakeError):
            c.request("127.0.0.1", w.port, "write", body, timeout_s=0.3)
    finally:
        c.close()
    assert not w._loop.leases.pending_writes and w.side_channel_stats["rejected_auth"] == 1


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_peers_sharing_the_secret_move_kv(engines, mode):
    opts = {"secret": SECRET, "verify_checksums": True}
    P = engines("prefill", mode=mode, options=opts)
    D = engines("decode", mode=mode, options=opts)
    P.fill(7)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert "d" not in D.failed
    assert_transferred(P, D, [[1, 2, 3]], [[4, 5, 6]], 0, 40)
    assert P.workers[0].side_channel_stats["rejected_auth"] == 0


def test_worker_listener_binds_only_the_configured_host(engines):
    P = engines("prefill", options={"side_channel_host": "127.0.0.1"})
    port = P.workers[0].port
    with socket.socket() as s:
        with pytest.raises(OSError):
            s.bind(("127.0.0.1", port))
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", port))  # another loopback address: not taken by the listener
        except OSError as e:  # pragma: no cover - hosts without 127.0.0.2
            pytest.skip(f"127.0.0.2 unavailable: {e}")
