"""Notifications between MoRI-IO transports: a ZMQ PUSH/PULL mailbox per transport.

MoRI-IO has no message channel of its own: its inbound transfer statuses (``enable_notification``)
carry only a transfer uid, need the target to know the initiator's uids, and vLLM and SGLang both
turn them off (an ENOMEM on the notification post poisons the transfer's statuses). kvconnect's P/D
notices (``done`` / ``written`` / ``failed``) carry request ids, so each transport binds one PULL
socket, advertises its address in its handshake blob, and peers PUSH signed letters to it.

Sending never blocks (``NOBLOCK``; a full queue towards a dead peer is an error the caller sees);
receiving drains what has arrived without waiting. One owner thread (the transport's).
"""

from __future__ import annotations

import logging

import msgspec

from kvconnect.errors import TransferError, WireError
from kvconnect.handshake import _as_secret, _open, _sign, is_ipv6, zmq_endpoint

logger = logging.getLogger(__name__)

#: Largest letter accepted (P/D notices are tens of bytes).
MAX_LETTER_BYTES = 64 * 1024
#: Letters queued towards one peer before sending fails rather than grows without bound.
SEND_HWM = 10_000
#: Letters taken per :meth:`Mailbox.drain` call, so one call stays short under a flood.
DRAIN_MAX = 4096


class Letter(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    sender: str
    body: bytes


class Mailbox:
    def __init__(self, host: str, secret: str | None = None) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._secret = _as_secret(secret)
        self._rx = self._ctx.socket(zmq.PULL)
        self._rx.setsockopt(zmq.LINGER, 0)
        self._rx.setsockopt(zmq.MAXMSGSIZE, MAX_LETTER_BYTES)
        if is_ipv6(host) or host in ("*", "::"):
            self._rx.setsockopt(zmq.IPV6, 1)
        try:
            self.port = self._rx.bind_to_random_port(zmq_endpoint(host, 0).rsplit(":", 1)[0])
        except zmq.ZMQError as e:
            self._rx.close()
            raise TransferError(f"MoRI notification socket cannot listen on {host}: {e}") from e
        self.host = host
        self._tx: dict[tuple[str, int], object] = {}
        self.rejected = 0

    def send(self, host: str, port: int, sender: str, body: bytes) -> None:
        zmq = self._zmq
        key = (host, port)
        sock = self._tx.get(key)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            if is_ipv6(host):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(zmq_endpoint(host, port))
            self._tx[key] = sock
        try:
            sock.send(_sign(self._secret, Letter(sender, bytes(body))), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise TransferError(f"cannot notify {host}:{port}: {e}") from e

    def forget(self, host: str, port: int) -> None:
        sock = self._tx.pop((host, port), None)
        if sock is not None:
            sock.close(linger=0)

    def drain(self) -> list[tuple[str, bytes]]:
        zmq = self._zmq
        out: list[tuple[str, bytes]] = []
        for _ in range(DRAIN_MAX):
            try:
                frame = self._rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                logger.debug("MoRI notification socket receive failed", exc_info=True)
                break
            try:
                letter = _open(self._secret, frame, Letter, "MoRI notification")
            except (PermissionError, WireError) as e:
                self.rejected += 1
                logger.debug("dropping a MoRI notification: %s", e)
                continue
            out.append((letter.sender, letter.body))
        return out

    def close(self) -> None:
        for key in list(self._tx):
            self.forget(*key)
        self._rx.close(linger=0)
