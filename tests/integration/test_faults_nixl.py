"""Fault injection over real NIXL (UCX over loopback) between processes: a producer killed after a
transfer, a consumer request aborted while its READ is in flight. Every wait has a deadline; at
the end every block is freed on the surviving side and it serves the next request."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import pytest

pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from tests.integration.test_nixl_pd import Child  # noqa: E402

pytestmark = pytest.mark.integration
FAULT = {"handshake_timeout_s": 1.0, "transfer_timeout_s": 2.0, "verify_checksums": True}


def _serve(role: str, specs: dict, inq, outq) -> None:
    """Like test_nixl_pd's child, plus ``abort`` (the engine aborts a consumer request) and
    ``idle`` (reports whether the engine holds anything)."""
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config

        from tests.unit.pd_harness import Engine, Req, decode_start, prefill

        engines = {name: Engine(f"{role}-{name}-{os.getpid()}", agent_factory=nixl_agent,
                                config_factory=nixl_agent_config, **spec) for name, spec in specs.items()}
        outq.put(("ready", os.getpid()))
        seen_s, seen_r = set(), set()
        while True:
            try:
                cmd = inq.get(timeout=0.002)
            except queue.Empty:
                cmd = None
            for eng in engines.values():
                eng.step()
                for rid in eng.sending - seen_s:
                    seen_s.add(rid)
                    outq.put(("sent", rid))
                for rid in eng.recving - seen_r:
                    seen_r.add(rid)
                    outq.put(("recv", rid, rid in eng.failed, sorted(eng.invalid)))
            if cmd is None:
                continue
            if cmd[0] == "stop":
                break
            eng = engines[cmd[1]]
            if cmd[0] == "prefill":
                _, _, rid, n, ids = cmd
                eng.fill(seed=11)
                _, params = prefill(eng, rid, n, ids)
                outq.put(("params", rid, params, None))
            elif cmd[0] == "decode":
                _, _, rid, n, params, ids = cmd
                decode_start(eng, rid, n, params, ids)
            elif cmd[0] == "abort":
                _, _, rid, n, params, ids = cmd
                delay, _ = eng.sched.request_finished(Req(rid, list(range(n)), params, "abort").view(), ids)
                outq.put(("aborted", rid, delay))
            elif cmd[0] == "idle":
                held = eng.sched.has_pending_work() or any(w._loop._loads or w._loop._leases for w in eng.workers)
                outq.put(("idle", cmd[1], not held))
        for eng in engines.values():
            eng.shutdown()
        outq.put(("stopped",))
    except Exception:
        outq.put(("error", traceback.format_exc()))


class FaultChild(Child):
    def __init__(self, ctx, role: str, specs: dict) -> None:  # noqa: D107 - same as Child, other target
        self.inq, self.outq = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(role, specs, self.inq, self.outq), daemon=True)
        self.proc.start()
        self.events = []
        self._pid = None


@pytest.fixture
def spawn():
    ctx = mp.get_context("spawn")
    children: list[FaultChild] = []

    def make(*specs):
        made = [FaultChild(ctx, role, spec) for role, spec in specs]
        for c in made:
            c.pid  # noqa: B018 - wait until ready
        children.extend(made)
        return made

    yield make
    for c in children:
        try:
            os.kill(c.pid, signal.SIGCONT)
        except (ProcessLookupError, AssertionError):
            pass
        c.close()


def _idle(child: FaultChild, name: str = "e", timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        child.send("idle", name)
        if child.expect("idle", name)[2]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} still holds blocks after {timeout}s")


def _good(P, D, tag: str, p_ids, d_ids) -> None:
    P.send("prefill", "e", f"p{tag}", 40, p_ids)
    _, _, params, _ = P.expect("params", f"p{tag}")
    D.send("decode", "e", f"d{tag}", 40, params, d_ids)
    assert D.expect("recv", f"d{tag}")[2] is False
    P.expect("sent", f"p{tag}")


def test_producer_killed_after_a_transfer_then_a_new_producer_is_served(spawn):
    P, D, P2 = spawn(("prefill", {"e": {"options": FAULT}}), ("decode", {"e": {"options": FAULT}}),
                     ("prefill2", {"e": {"options": FAULT}}))
    _good(P, D, "0", [[1, 2, 3]], [[4, 5, 6]])
    P.send("prefill", "e", "p1", 40, [[7, 8, 9]])
    _, _, params, _ = P.expect("params", "p1")
    os.kill(P.pid, signal.SIGKILL)  # gone after the first transfer, before the second
    P.proc.join(timeout=5)
    t0 = time.monotonic()
    D.send("decode", "e", "d1", 40, params, [[10, 11, 12]])
    ev = D.expect("recv", "d1", timeout=10)
    assert ev[2] is True and {10, 11, 12} <= set(ev[3])
    assert time.monotonic() - t0 < FAULT["handshake_timeout_s"] + FAULT["transfer_timeout_s"] + 2
    _idle(D)
    _good(P2, D, "2", [[1, 2, 3]], [[13, 14, 15]])  # the consumer still serves
    _idle(D)
    _idle(P2)


def test_abort_while_the_read_is_in_flight_frees_only_after_the_transfer_ended(spawn):
    P, D = spawn(("prefill", {"e": {"options": FAULT}}), ("decode", {"e": {"options": FAULT}}))
    _good(P, D, "0", [[1, 2, 3]], [[4, 5, 6]])  # handshaken and connected
    P.send("prefill", "e", "p1", 40, [[7, 8, 9]])
    _, _, params, _ = P.expect("params", "p1")
    os.kill(P.pid, signal.SIGSTOP)  # the READ is posted but cannot complete
    try:
        t0 = time.monotonic()
        D.send("decode", "e", "d1", 40, params, [[10, 11, 12]])
        time.sleep(0.3)
        D.send("abort", "e", "d1", 40, params, [[10, 11, 12]])
        assert D.expect("aborted", "d1")[2] is True
        with pytest.raises(AssertionError):
            D.expect("sent", "d1", timeout=0.5)  # still in flight: the blocks stay allocated
    finally:
        os.kill(P.pid, signal.SIGCONT)
    D.expect("sent", "d1", timeout=10)  # the transfer ended (done or failed): now freed
    assert time.monotonic() - t0 < FAULT["handshake_timeout_s"] + FAULT["transfer_timeout_s"] + 3
    P.expect("sent", "p1", timeout=10)
    _idle(D)
    _idle(P)
    _good(P, D, "2", [[1, 2, 3]], [[13, 14, 15]])
