"""The event loop under the P/D progress thread (kvconnect.pd.loop): typed dispatch, timers, the
poll cadence, and the progress loop's use of it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from kvconnect.pd import wire as W
from kvconnect.pd.loop import EventLoop
from kvconnect.pd.messages import MESSAGES, TIMERS


@dataclass(frozen=True)
class Ping:
    n: int


@dataclass(frozen=True)
class Pong:
    n: int


@dataclass(frozen=True)
class Ring:
    label: str
    when: float


def _wait(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


@pytest.fixture
def make_loop():
    loops: list[EventLoop] = []

    def make(**kw) -> EventLoop:
        kw.setdefault("poll_interval_s", 0.001)
        kw.setdefault("idle_poll_interval_s", 0.02)
        loop = EventLoop(name="test-loop", **kw)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.stop(timeout=5)


def test_messages_reach_the_handler_of_their_type_in_order_on_the_loop_thread(make_loop):
    got: list[tuple[str, int, str]] = []
    loop = make_loop()
    loop.handle(Ping, lambda m: got.append(("ping", m.n, threading.current_thread().name)))
    loop.handle(Pong, lambda m: got.append(("pong", m.n, threading.current_thread().name)))
    loop.start()
    for i in range(5):
        loop.post(Ping(i) if i % 2 else Pong(i))
    assert _wait(lambda: len(got) == 5)
    assert [(k, n) for k, n, _ in got] == [("pong", 0), ("ping", 1), ("pong", 2), ("ping", 3), ("pong", 4)]
    assert {t for _, _, t in got} == {"test-loop"}


def test_posting_a_message_with_no_handler_fails_at_the_sender(make_loop):
    loop = make_loop()
    loop.handle(Ping, lambda m: None)
    with pytest.raises(TypeError, match="Pong"):
        loop.post(Pong(1))
    with pytest.raises(TypeError, match="tuple"):
        loop.post(("ping", 1))


def test_timers_fire_in_time_order_not_before_their_time(make_loop):
    fired: list[tuple[str, float, float]] = []
    loop = make_loop()
    loop.on_timer(Ring, lambda t, now: fired.append((t.label, t.when, now)))

    def arm() -> None:
        t0 = time.monotonic()
        for label, dt in (("late", 0.06), ("early", 0.01), ("middle", 0.03)):
            loop.at(t0 + dt, Ring(label, t0 + dt))

    loop.start()
    loop.call(arm)
    assert _wait(lambda: len(fired) == 3)
    assert [label for label, _, _ in fired] == ["early", "middle", "late"]
    assert all(now >= when for _, when, now in fired)


def test_a_timer_with_no_handler_is_refused_when_set(make_loop):
    loop = make_loop()
    errors: list[Exception] = []

    def arm() -> None:
        try:
            loop.at(time.monotonic(), Ping(1))
        except TypeError as e:
            errors.append(e)

    loop.start()
    loop.call(arm)
    assert _wait(lambda: errors)
    assert "Ping" in str(errors[0])


def test_an_idle_loop_without_a_cadence_sleeps_until_a_message_or_its_next_timer(make_loop):
    fired: list[float] = []
    loop = make_loop(idle_poll_interval_s=None)
    loop.on_timer(Ring, lambda t, now: fired.append(now))
    loop.start()
    time.sleep(0.2)
    assert loop.rounds <= 2, f"{loop.rounds} rounds with nothing to do: the loop spins"
    t0 = time.monotonic()
    loop.call(lambda: loop.at(t0 + 0.05, Ring("x", t0 + 0.05)))
    assert _wait(lambda: fired, timeout=2.0), "a timer must wake a loop that waits for messages"
    assert fired[0] - t0 < 1.0


def test_busy_picks_the_short_wait_and_poll_runs_every_round(make_loop):
    busy = threading.Event()
    polls: list[float] = []
    loop = make_loop(poll_interval_s=0.002, idle_poll_interval_s=0.5, busy=busy.is_set, poll=polls.append)
    loop.start()
    time.sleep(0.2)
    idle_polls = len(polls)
    busy.set()
    loop.call(lambda: None)  # wake it: the wait it is in was picked while idle
    time.sleep(0.2)
    busy_polls = len(polls) - idle_polls
    assert idle_polls <= 2, f"{idle_polls} polls while idle at a 0.5 s cadence"
    assert busy_polls >= 10, f"only {busy_polls} polls in 0.2 s at a 2 ms cadence"
    assert loop.rounds >= len(polls)


def test_a_failing_handler_is_logged_and_the_loop_goes_on(make_loop, caplog):
    got: list[int] = []
    ends: list[int] = []

    def handle(m: Ping) -> None:
        if m.n == 0:
            raise RuntimeError("boom")
        got.append(m.n)

    loop = make_loop(end_round=lambda: ends.append(1))
    loop.handle(Ping, handle)
    loop.start()
    loop.post(Ping(0))
    loop.post(Ping(1))
    assert _wait(lambda: got == [1])
    assert "a round failed" in caplog.text and "boom" in caplog.text
    assert ends, "end_round runs after a failed round too"


def test_stop_handles_what_was_posted_before_it_and_ends_the_round(make_loop):
    got: list[int] = []
    ends: list[int] = []
    loop = make_loop(end_round=lambda: ends.append(len(got)))
    loop.handle(Ping, lambda m: (time.sleep(0.01), got.append(m.n)))
    loop.start()
    for i in range(3):
        loop.post(Ping(i))
    loop.stop(timeout=5)
    assert got == [0, 1, 2]
    assert ends and ends[-1] == 3, "the notices of the last round are sent before the loop ends"


def test_the_progress_loop_has_a_handler_for_every_message_and_timer_type(engines):
    loop = engines("prefill").workers[0]._loop._events
    assert set(MESSAGES) <= set(loop._handlers)
    assert set(TIMERS) == set(loop._timer_handlers)


def test_the_progress_loop_takes_the_workers_tuple_messages_and_refuses_other_tuples(engines):
    """Callers written against the tuple form keep working: ("write", request) is a write
    request (held until its lease comes), and an unknown tag is refused where it is posted."""
    w = engines("prefill", mode="push").workers[0]
    wr = W.WriteRequest(producer_request_id="p", consumer_request_id="d", consumer_engine_id="c",
                        consumer_host="127.0.0.1", consumer_port=1, consumer_tp_size=1,
                        consumer_rank=0, block_ids=((1,),), token_start=0, token_end=16)
    w._loop.post(("write", wr))
    assert _wait(lambda: "p" in w._loop.leases.pending_writes)
    with pytest.raises(TypeError, match="write_sent"):
        w._loop.post(("write_sent", "d", None, 0, None))


def test_the_progress_loop_runs_a_call_on_its_own_thread(engines):
    w = engines("prefill").workers[0]
    ran: list[str] = []
    w._loop.call(lambda: ran.append(threading.current_thread().name))
    assert _wait(lambda: ran)
    assert ran == ["kvconnect-pd-progress"]
