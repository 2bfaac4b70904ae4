"""The side channel: a small request/reply service over ZMQ between kvconnect instances.

P/D backends use it to fetch a peer's handshake metadata (transport metadata, layout,
compatibility hash) and to pass control messages (push-mode write requests). Every request has a
deadline. The listener answers each request from a handler table, survives garbage, and, when a
shared secret is configured, rejects any message without a valid HMAC (and counts it): a client
without the secret gets nothing.

Wire format: one ZMQ frame holding a msgpack :class:`Signed` envelope. The MAC covers the payload;
the reply echoes the request nonce inside its signed payload, so a reply cannot be replayed
against another request.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from kvconnect.errors import HandshakeError, PeerRefusedError, WireError
from kvconnect.metadata import decode, encode
from kvconnect.telemetry import Counters

logger = logging.getLogger(__name__)

#: Largest message the listener accepts or a client reads.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

Handler = Callable[[bytes], bytes]


class Signed(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    payload: bytes
    mac: bytes = b""


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: str
    nonce: bytes
    body: bytes = b""


class Reply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    nonce: bytes
    ok: bool
    body: bytes = b""
    error: str = ""


def _mac(secret: bytes | None, payload: bytes) -> bytes:
    return hmac.new(secret, payload, "sha256").digest() if secret else b""


def _sign(secret: bytes | None, obj: msgspec.Struct) -> bytes:
    payload = encode(obj)
    return encode(Signed(payload, _mac(secret, payload)))


def _open(secret: bytes | None, frame: bytes, type_, what: str):
    env = decode(frame, Signed, what=what, max_bytes=MAX_MESSAGE_BYTES)
    if secret is not None and not hmac.compare_digest(env.mac, _mac(secret, env.payload)):
        raise PermissionError(f"{what}: bad or missing HMAC")
    return decode(env.payload, type_, what=what, max_bytes=MAX_MESSAGE_BYTES)


def _as_secret(secret: str | bytes | None) -> bytes | None:
    if secret is None or secret == "":
        return None
    return secret.encode() if isinstance(secret, str) else secret


# -- addresses -------------------------------------------------------------------------------------
def is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).version == 6
    except ValueError:
        return False


def zmq_endpoint(host: str, port: int) -> str:
    h = host.strip("[]")
    if h == "*":
        return f"tcp://*:{port}"
    return f"tcp://[{h}]:{port}" if is_ipv6(h) else f"tcp://{h}:{port}"


# -- listener -------------------------------------------------------------------------------------
@dataclass(slots=True)
class SideChannelCounters(Counters):
    """What a side-channel listener counts (written on its thread only)."""

    requests: int = 0
    rejected_auth: int = 0
    rejected_garbage: int = 0
    handler_errors: int = 0


class SideChannelServer:
    """Answers requests from a handler table on a background thread.

    A handler takes the request body and returns the reply body; raising ``WireError`` or
    ``ValueError`` sends a clear refusal, anything else is logged and refused without
    details. The thread blocks on its sockets (no polling loop) and stops via an inproc pipe.
    """

    def __init__(
        self,
        host: str,
        port: int,
        handlers: Mapping[str, Handler],
        secret: str | bytes | None = None,
    ) -> None:
        import zmq

        self._zmq = zmq
        self._handlers = dict(handlers)
        self._secret = _as_secret(secret)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
        if is_ipv6(host) or host in ("*", "::"):
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            if port == 0:
                self.port = self._sock.bind_to_random_port(zmq_endpoint(host, 0).rsplit(":", 1)[0])
            else:
                self._sock.bind(zmq_endpoint(host, port))
                self.port = port
        except zmq.ZMQError as e:
            self._sock.close()
            raise HandshakeError(f"side channel cannot listen on {host}:{port}: {e}") from e
        self.host = host
        self._counts = SideChannelCounters()
        self._wake_addr = f"inproc://kvconnect-side-channel-{id(self)}-{os.getpid()}"
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self._thread = threading.Thread(target=self._run, name="kvconnect-side-channel", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> dict[str, float]:
        """A snapshot of the listener's counters (:class:`SideChannelCounters`)."""
        return self._counts.as_dict()

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_rx in events:
                break
            if self._sock in events:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if len(frames) < 2:
                    self._counts.rejected_garbage += 1
                    continue
                ident, frame = frames[0], frames[-1]
                reply = self._answer(frame)
                if reply is not None:
                    try:
                        self._sock.send_multipart([ident, reply], zmq.NOBLOCK)
                    except zmq.ZMQError:  # peer gone: nothing to do
                        pass
        self._sock.close()
        self._wake_rx.close()

    def _answer(self, frame: bytes) -> bytes | None:
        try:
            req = _open(self._secret, frame, Request, "side-channel request")
        except PermissionError:
            self._counts.rejected_auth += 1
            logger.warning("side channel: rejected a request with a bad HMAC")
            return None  # say nothing to an unauthenticated client
        except WireError:
            self._counts.rejected_garbage += 1
            return None
        self._counts.requests += 1
        handler = self._handlers.get(req.kind)
        if handler is None:
            return _sign(self._secret, Reply(req.nonce, False, error=f"unknown request kind {req.kind!r}"))
        try:
            body = handler(req.body)
        except (WireError, ValueError, KeyError) as e:
            self._counts.handler_errors += 1
            return _sign(self._secret, Reply(req.nonce, False, error=f"{req.kind}: {e}"))
        except Exception:
            self._counts.handler_errors += 1
            logger.exception("side channel handler %r failed", req.kind)
            return _sign(self._secret, Reply(req.nonce, False, error=f"{req.kind}: internal error"))
        return _sign(self._secret, Reply(req.nonce, True, body=body))

    def close(self) -> None:
        if self._thread.is_alive():
            self._wake_tx.send(b"")
            self._thread.join(timeout=5)
        self._wake_tx.close()

    def __enter__(self) -> SideChannelServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- client ----------------------------------------------------------------------------------------
class SideChannelClient:
    """Sends requests with deadlines. One socket per peer, replaced after any failure so a late
    reply can never be mistaken for the next one. Not thread-safe: one owner thread."""

    def __init__(self, secret: str | bytes | None = None) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._secret = _as_secret(secret)
        self._socks: dict[tuple[str, int], object] = {}

    def _socket(self, host: str, port: int):
        key = (host, port)
        s = self._socks.get(key)
        if s is None:
            zmq = self._zmq
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
            if is_ipv6(host):
                s.setsockopt(zmq.IPV6, 1)
            s.connect(zmq_endpoint(host, port))
            self._socks[key] = s
        return s

    def _drop(self, host: str, port: int) -> None:
        s = self._socks.pop((host, port), None)
        if s is not None:
            s.close(linger=0)

    def request(self, host: str, port: int, kind: str, body: bytes = b"", timeout_s: float = 10.0) -> bytes:
        """Send one request and return the reply body, or raise HandshakeError within
        ``timeout_s`` naming the peer and what went wrong."""
        zmq = self._zmq
        where = f"{host}:{port}"
        deadline = time.monotonic() + timeout_s
        nonce = os.urandom(12)
        sock = self._socket(host, port)
        try:
            sock.send(_sign(self._secret, Request(kind, nonce, body)), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._drop(host, port)
            raise HandshakeError(f"side channel {where}: cannot send {kind!r}: {e}") from e
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms, zmq.POLLIN):
                self._drop(host, port)
                raise HandshakeError(
                    f"side channel {where}: no reply to {kind!r} within {timeout_s:g}s "
                    "(listener down, wrong address, or a secret mismatch)"
                )
            frame = sock.recv()
            try:
                reply = _open(self._secret, frame, Reply, f"reply from {where}")
            except (PermissionError, WireError) as e:
                self._drop(host, port)
                raise HandshakeError(f"side channel {where}: {e}") from e
            if reply.nonce != nonce:
                continue  # a late reply to an earlier request: skip it
            if not reply.ok:
                raise PeerRefusedError(f"side channel {where} refused {kind!r}: {reply.error}")
            return reply.body

    def close(self) -> None:
        for key in list(self._socks):
            self._drop(*key)
