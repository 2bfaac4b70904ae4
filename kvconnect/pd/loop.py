"""One thread that owns a transport: it takes typed messages from an inbox, polls, fires timers.

Nothing here knows P/D. A user registers one handler per message type (:meth:`EventLoop.handle`)
and per timer type (:meth:`EventLoop.on_timer`), and gives the round's own work (``poll``), what
to do once a round ended (``end_round``) and whether anything is in flight (``busy``). Each round:

1. wait on the inbox: ``poll_interval_s`` while busy, ``idle_poll_interval_s`` otherwise (None:
   until a message comes), never past the next timer;
2. handle every message waiting, in order, dispatched by its type;
3. ``poll(now)``; fire every timer due at ``now``;
4. ``end_round()`` (e.g. send the notices the round produced, after every transfer it posted).

Messages come from any thread (:meth:`post`, :meth:`call`); timers are set on the loop's thread
(:meth:`at`), from a handler or ``poll``. A handler that raises is logged and the loop goes on: a
bug must not silently stop every transfer of the worker. The P/D progress thread
(:mod:`kvconnect.pd.progress`) is one user; a transfer backend with its own protocol can be another.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn`` on the loop's thread (state it touches then needs no lock)."""

    fn: Callable[[], None]


class _Stop:
    """Ends the loop once the messages posted before it were handled."""


_STOP = _Stop()


def _nothing() -> None:
    pass


class EventLoop:
    def __init__(
        self,
        *,
        name: str,
        poll_interval_s: float,
        idle_poll_interval_s: float | None,
        busy: Callable[[], bool] = lambda: False,
        poll: Callable[[float], None] = lambda now: None,
        end_round: Callable[[], None] = _nothing,
    ) -> None:
        self._name = name
        self._busy_wait = poll_interval_s
        self._idle_wait = idle_poll_interval_s
        self._busy = busy
        self._poll = poll
        self._end_round = end_round
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._handlers: dict[type, Callable[[Any], None]] = {Call: _call}
        self._timer_handlers: dict[type, Callable[[Any, float], None]] = {}
        #: (when, sequence, timer): the sequence keeps equal times in order and timers uncompared
        self._timers: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Rounds run so far (the loop sleeps between rounds; tests check it does not spin).
        self.rounds = 0

    # -- set up, before start -------------------------------------------------------------------
    def handle(self, kind: type[M], fn: Callable[[M], None]) -> None:
        """Messages of type ``kind`` (exactly; subclasses are types of their own) go to ``fn``."""
        self._handlers[kind] = fn

    def on_timer(self, kind: type[M], fn: Callable[[M, float], None]) -> None:
        """Due timers of type ``kind`` go to ``fn(timer, now)``."""
        self._timer_handlers[kind] = fn

    # -- any thread -----------------------------------------------------------------------------
    def post(self, msg: object) -> None:
        if type(msg) not in self._handlers:  # a mistake is the sender's, caught where it is made
            raise TypeError(f"{self._name}: no handler for a message of type {type(msg).__name__}")
        self._inbox.put(msg)

    def call(self, fn: Callable[[], None]) -> None:
        self._inbox.put(Call(fn))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop after the messages already posted, and wait for its thread."""
        self._stop.set()
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    # -- the loop's thread ------------------------------------------------------------------------
    def at(self, when: float, timer: object) -> None:
        """Fire ``timer`` in the first round at or after ``when`` (``time.monotonic()`` clock)."""
        if type(timer) not in self._timer_handlers:
            raise TypeError(f"{self._name}: no handler for a timer of type {type(timer).__name__}")
        heapq.heappush(self._timers, (when, next(self._seq), timer))

    def _wait_s(self) -> float | None:
        wait = self._busy_wait if self._busy() else self._idle_wait
        if self._timers:
            until = max(0.0, self._timers[0][0] - time.monotonic())
            wait = until if wait is None else min(wait, until)
        return wait

    def _run(self) -> None:
        inbox, handlers, timers = self._inbox, self._handlers, self._timers
        while not self._stop.is_set():
            self.rounds += 1
            msg: object | None
            try:
                msg = inbox.get(timeout=self._wait_s())
            except queue.Empty:
                msg = None
            try:
                while msg is not None:
                    if msg is _STOP:
                        self._end_round()
                        return
                    handlers[type(msg)](msg)
                    msg = None if inbox.empty() else inbox.get_nowait()
                now = time.monotonic()
                self._poll(now)
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    self._timer_handlers[type(timer)](timer, now)
            except Exception:
                logger.exception("%s: a round failed", self._name)
            try:
                self._end_round()
            except Exception:
                logger.exception("%s: ending a round failed", self._name)


def _call(c: Call) -> None:
    c.fn()
