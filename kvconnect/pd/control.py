"""The worker's control thread: every blocking side-channel request (fetching a peer's handshake
metadata, sending a push-mode write request) runs here, one at a time, each with its deadline,
so neither the engine thread nor the transfer progress thread ever waits on the network."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from kvconnect.errors import HandshakeError, KVConnectError, WireError
from kvconnect.handshake import SideChannelClient
from kvconnect.metadata import HandshakeMetadata, decode

logger = logging.getLogger(__name__)

#: ``on_done(result, error)``; called on the control thread, so it must only hand off.
Done = Callable[[Any, "KVConnectError | None"], None]


class ControlThread:
    def __init__(self, secret: str | None, timeout_s: float, name: str = "kvconnect-pd-control") -> None:
        self._timeout = timeout_s
        self._secret = secret
        self._q: queue.Queue = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def fetch_metadata(self, host: str, port: int, on_done: Done) -> None:
        """Ask ``host:port`` for its :class:`HandshakeMetadata`."""
        self._q.put(("metadata", host, port, b"", on_done))

    def request(self, host: str, port: int, kind: str, body: bytes, on_done: Done) -> None:
        self._q.put((kind, host, port, body, on_done))

    def _run(self) -> None:
        client = SideChannelClient(self._secret)
        try:
            while True:
                item = self._q.get()
                if item is None or self._stopping:
                    return
                kind, host, port, body, on_done = item
                result, error = None, None
                try:
                    reply = client.request(host, port, kind, body, timeout_s=self._timeout)
                    if kind == "metadata":
                        try:
                            result = decode(
                                reply, HandshakeMetadata, what=f"handshake metadata from {host}:{port}"
                            )
                        except WireError as e:
                            raise HandshakeError(str(e)) from e
                    else:
                        result = reply
                except KVConnectError as e:
                    error = e
                except Exception as e:  # never let the thread die on an unexpected failure
                    logger.exception("side-channel %r to %s:%s failed", kind, host, port)
                    error = HandshakeError(f"side channel {host}:{port}: {kind!r} failed: {e}")
                try:
                    on_done(result, error)
                except Exception:
                    logger.exception("control callback failed")
        finally:
            client.close()

    def close(self) -> None:
        self._stopping = True
        self._q.put(None)
        self._thread.join(timeout=self._timeout + 5)
