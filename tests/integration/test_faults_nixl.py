"""Fault injection over real NIXL (UCX over loopback) between processes: a producer killed after a
transfer, a consumer request aborted while its READ is in flight. Every wait has a deadline; at
the end every block is freed on the surviving side and it serves the next request."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from kvconnect.testing.ports import free_port_range  # noqa: E402
from tests.integration.nixl_procs import Child, close_all  # noqa: E402

pytestmark = pytest.mark.integration
FAULT = {"handshake_timeout_s": 1.0, "transfer_timeout_s": 2.0, "verify_checksums": True}


@pytest.fixture
def spawn():
    ctx = mp.get_context("spawn")
    children: list[Child] = []

    def make(*specs):
        made = [Child(ctx, role, spec) for role, spec in specs]
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
    close_all(children)


def _idle(child: Child, name: str = "e", timeout: float = 10.0) -> None:
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
    P.signal(signal.SIGKILL)  # gone after the first transfer, before the second
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


def test_producer_restarted_under_the_same_engine_id_and_port_is_served_again(spawn):
    # A deployment that pins engine_id: the consumer holds the killed producer's NIXL agent and
    # prepared lists; after at most one failed load it must handshake with the new process.
    port = free_port_range(1)
    fixed = {"engine_id": "prefill-pinned", "options": {**FAULT, "side_channel_port": port}}
    P, D = spawn(("prefill", {"e": dict(fixed)}), ("decode", {"e": {"options": FAULT}}))
    _good(P, D, "0", [[1, 2, 3]], [[4, 5, 6]])
    P.signal(signal.SIGKILL)
    P.proc.join(timeout=5)
    (P2,) = spawn(("prefill", {"e": dict(fixed)}))
    P2.send("prefill", "e", "p1", 40, [[7, 8, 9]])
    _, _, params, _ = P2.expect("params", "p1")
    t0 = time.monotonic()
    D.send("decode", "e", "d1", 40, params, [[10, 11, 12]])
    D.expect("recv", "d1", timeout=10)  # may fail once, against the old incarnation
    assert time.monotonic() - t0 < FAULT["handshake_timeout_s"] + FAULT["transfer_timeout_s"] + 2
    P2.send("prefill", "e", "p2", 40, [[13, 14, 15]])
    _, _, params, dump = P2.expect("params", "p2")
    D.send("decode", "e", "d2", 40, params, [[16, 17, 18]])
    assert D.expect("recv", "d2", timeout=10)[2] is False, "the consumer never reached the restarted producer"
    D.send("check", "e", dump, {}, [[13, 14, 15]], [[16, 17, 18]], 0, 40)
    assert D.expect("checked", "e")[2] == "ok"
    _idle(D)


def test_abort_while_the_read_is_in_flight_frees_only_after_the_transfer_ended(spawn):
    P, D = spawn(("prefill", {"e": {"options": FAULT}}), ("decode", {"e": {"options": FAULT}}))
    _good(P, D, "0", [[1, 2, 3]], [[4, 5, 6]])  # handshaken and connected
    P.send("prefill", "e", "p1", 40, [[7, 8, 9]])
    _, _, params, _ = P.expect("params", "p1")
    P.signal(signal.SIGSTOP)  # the READ is posted but cannot complete
    try:
        t0 = time.monotonic()
        D.send("decode", "e", "d1", 40, params, [[10, 11, 12]])
        time.sleep(0.3)
        D.send("abort", "e", "d1", 40, params, [[10, 11, 12]])
        assert D.expect("aborted", "d1")[2] is True
        with pytest.raises(AssertionError):
            D.expect("sent", "d1", timeout=0.5)  # still in flight: the blocks stay allocated
    finally:
        P.signal(signal.SIGCONT)
    D.expect("sent", "d1", timeout=10)  # the transfer ended (done or failed): now freed
    assert time.monotonic() - t0 < FAULT["handshake_timeout_s"] + FAULT["transfer_timeout_s"] + 3
    P.expect("sent", "p1", timeout=10)
    _idle(D)
    _idle(P)
    _good(P, D, "2", [[1, 2, 3]], [[13, 14, 15]])
