"""The one thread that touches a rank's :class:`~kvconnect.pd.transport.Transport`.

On a prefill rank it loads decode peers, posts page writes and polls them against their deadline;
on a decode rank it progresses the transfer engine as a write *target* while any request waits
for KV (NIXL without its progress thread completes a write only when the target is progressed).

It blocks on its inbox: for ``poll_interval_s`` while writes are in flight or the target must be
progressed, indefinitely when there is nothing to do. Nothing here knows SGLang: the manager
hands in descriptor lists and gets ``on_done(error_or_None)`` callbacks, on this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvconnect.errors import KVConnectError
from kvconnect.pd.transport import Op, Region, Status, Transport

logger = logging.getLogger(__name__)

Done = Callable[[str | None], None]


@dataclass(slots=True, eq=False)
class _Write:
    peer: str
    local: Any
    remote: Any
    handle: Any
    deadline: float
    nbytes: int
    on_done: Done


class PushLoop:
    def __init__(
        self,
        transport: Transport,
        *,
        poll_interval_s: float,
        timeout_s: float,
        target_active: Callable[[], bool] = lambda: False,
        name: str = "kvconnect-sglang-push",
    ) -> None:
        self._t = transport
        self._poll = poll_interval_s
        self._timeout = timeout_s
        self._target_active = target_active
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writes: list[_Write] = []
        self.stats = {"writes": 0, "bytes": 0, "failed": 0, "timed_out": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------------
    def add_peer(self, metadata: bytes, regions: Sequence[Region], on_done: Callable[[str | None, str | None], None]) -> None:
        """Load a peer; ``on_done(peer_handle, error)`` runs on the loop thread."""
        self._inbox.put(("peer", metadata, list(regions), on_done))

    def write(self, peer: str, local_descs: np.ndarray, remote_descs: np.ndarray, on_done: Done) -> None:
        """Push local byte ranges into the peer's, pairwise; ``on_done(None)`` once every byte
        landed, ``on_done(reason)`` on failure or when the deadline passes first."""
        self._inbox.put(("write", peer, local_descs, remote_descs, on_done, time.monotonic() + self._timeout))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (keeps every piece of per-room state single-threaded)."""
        self._inbox.put(("call", fn))

    def wake(self) -> None:
        self._inbox.put(("wake",))

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    # -- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            busy = bool(self._writes) or self._target_active()
            try:
                item = self._inbox.get(timeout=self._poll if busy else None)
            except queue.Empty:
                item = None
            while item is not None:
                if item[0] == "stop":
                    self._shutdown()
                    return
                try:
                    self._handle(item)
                except Exception:  # never let one bad item kill the loop
                    logger.exception("kvconnect push loop: handling %s failed", item[0])
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self._writes or self._target_active():
                self._t.notifications()  # progresses the engine as a target, too
            if self._writes:
                self._poll_writes(time.monotonic())

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "peer":
            _, metadata, regions, on_done = item
            try:
                peer = self._t.add_peer(metadata, regions)
            except KVConnectError as e:
                on_done(None, str(e))
            else:
                on_done(peer, None)
        elif kind == "write":
            self._start(*item[1:])
        elif kind == "call":
            item[1]()

    def _start(self, peer: str, local_descs: np.ndarray, remote_descs: np.ndarray, on_done: Done, deadline: float) -> None:
        n = len(local_descs)
        if n == 0:
            on_done(None)
            return
        lp = rp = None
        try:
            lp = self._t.prepare(None, local_descs)
            rp = self._t.prepare(peer, remote_descs)
            idx = np.arange(n, dtype=np.int64)
            h = self._t.start(Op.WRITE, peer, lp, idx, rp, idx)
        except KVConnectError as e:
            for p in (lp, rp):
                if p is not None:
                    self._release_prepared(p)
            self.stats["failed"] += 1
            on_done(f"write to {peer} could not start: {e}")
            return
        nbytes = int(np.asarray(local_descs)[:, 2].sum())
        self._writes.append(_Write(peer, lp, rp, h, deadline, nbytes, on_done))

    def _poll_writes(self, now: float) -> None:
        keep: list[_Write] = []
        for w in self._writes:
            st = self._t.poll(w.handle)
            if st is Status.BUSY and now < w.deadline:
                keep.append(w)
                continue
            self._t.release(w.handle)
            self._release_prepared(w.local)
            self._release_prepared(w.remote)
            if st is Status.DONE:
                self.stats["writes"] += 1
                self.stats["bytes"] += w.nbytes
                w.on_done(None)
            elif st is Status.FAILED:
                self.stats["failed"] += 1
                w.on_done(f"write of {w.nbytes} bytes to {w.peer} failed (peer gone or memory invalid)")
            else:
                self.stats["timed_out"] += 1
                w.on_done(f"write of {w.nbytes} bytes to {w.peer} did not finish within {self._timeout:g}s")
        self._writes = keep

    def _release_prepared(self, prepared: Any) -> None:
        try:
            self._t.release_prepared(prepared)
        except Exception:
            logger.debug("releasing a prepared descriptor list failed", exc_info=True)

    def _shutdown(self) -> None:
        for w in self._writes:
            self._t.release(w.handle)
            w.on_done("kvconnect is shutting down")
        self._writes = []
        try:
            self._t.close()
        except Exception:
            logger.debug("closing the transport failed", exc_info=True)
