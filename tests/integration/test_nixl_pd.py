"""P/D over real NIXL (UCX over loopback, host memory) between two processes: a producer engine
and a consumer engine, each with its scheduler half, TP workers and real side channels.

Both engines run in spawned child processes (a UCX assertion may fire at exit of a process whose
peer was killed; it must not take pytest with it); this process only orchestrates and checks.
Every wait has a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from tests.integration.nixl_procs import Child, close_all, spawn_children

pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
os.environ.setdefault("UCX_NET_DEVICES", "lo")

pytestmark = pytest.mark.integration


@pytest.fixture
def spawn():
    ctx = mp.get_context("spawn")
    children: list[Child] = []

    def make(*specs: tuple[str, dict]) -> list[Child]:
        made = spawn_children(ctx, *specs)
        children.extend(made)
        return made

    yield make
    close_all(children)


CASES = {
    "mha-flash-pull": ({"kind": "flash", "tp": 1}, {"kind": "flash", "tp": 1}),
    "mla-push": ({"kind": "mla", "tp": 1, "mode": "push"}, {"kind": "mla", "tp": 2, "mode": "push"}),
    "vllm-cpu-tp2-to-tp1-bs32-to-16": ({"kind": "cpu", "tp": 2, "block_size": 32}, {"kind": "cpu", "tp": 1}),
    "hnd-tp1-to-tp2-bs16-to-32-push": ({"kind": "hnd", "tp": 1, "mode": "push"},
                                       {"kind": "hnd", "tp": 2, "block_size": 32, "mode": "push"}),
}


@pytest.fixture(scope="module")
def case_pair():
    """One producer process and one consumer process hosting an engine per case."""
    ctx = mp.get_context("spawn")
    P, D = spawn_children(
        ctx, ("prefill", {k: v[0] for k, v in CASES.items()}), ("decode", {k: v[1] for k, v in CASES.items()})
    )
    yield P, D
    close_all([P, D])


@pytest.mark.parametrize("case", list(CASES))
def test_kv_moves_between_processes_byte_for_byte(case_pair, case):
    P, D = case_pair
    p_spec, d_spec = CASES[case]
    n = 70
    p_bs, d_bs = p_spec.get("block_size", 16), d_spec.get("block_size", 16)
    p_ids = [[3, 9, 4, 10, 12][: -(-n // p_bs)]]
    d_ids = [[7, 2, 15, 16, 5][: -(-n // d_bs)]]
    P.send("prefill", case, f"p-{case}", n, p_ids)
    _, _, params, dump = P.expect("params", f"p-{case}")
    D.send("decode", case, f"d-{case}", n, params, d_ids)
    ev = D.expect("recv", f"d-{case}")
    assert ev[2] is False, f"load failed: {ev}"
    P.expect("sent", f"p-{case}")
    D.send("check", case, dump, p_spec, p_ids, d_ids, 0, n)
    assert D.expect("checked", case)[2] == "ok"


FAULT = {"handshake_timeout_s": 1.0, "transfer_timeout_s": 2.0}


def test_producer_killed_before_the_transfer_fails_the_load_in_time(spawn):
    P, D = spawn(("prefill", {"e": {}}), ("decode", {"e": {"options": FAULT}}))
    P.send("prefill", "e", "p1", 40, [[1, 2, 3]])
    _, _, params, _ = P.expect("params")
    P.signal(signal.SIGKILL)
    P.proc.join(timeout=5)
    t0 = time.monotonic()
    D.send("decode", "e", "d1", 40, params, [[4, 5, 6]])
    ev = D.expect("recv", "d1", timeout=10)
    assert ev[2] is True and {4, 5, 6} <= set(ev[3])
    assert time.monotonic() - t0 < FAULT["handshake_timeout_s"] + FAULT["transfer_timeout_s"] + 2


def test_producer_killed_during_the_transfer_fails_the_load_in_time(spawn):
    P, D = spawn(("prefill", {"e": {}}), ("decode", {"e": {"options": FAULT}}))
    # a first request completes: the peers are handshaken and connected
    P.send("prefill", "e", "p0", 40, [[1, 2, 3]])
    _, _, params, _ = P.expect("params")
    D.send("decode", "e", "d0", 40, params, [[4, 5, 6]])
    assert D.expect("recv", "d0")[2] is False
    P.send("prefill", "e", "p1", 40, [[7, 8, 9]])
    _, _, params, _ = P.expect("params")
    P.signal(signal.SIGSTOP)  # the read is posted but cannot complete ...
    try:
        t0 = time.monotonic()
        D.send("decode", "e", "d1", 40, params, [[10, 11, 12]])
        time.sleep(0.3)
    finally:
        P.signal(signal.SIGKILL)  # ... and the producer dies while it is in flight
    ev = D.expect("recv", "d1", timeout=10)
    assert ev[2] is True and {10, 11, 12} <= set(ev[3])
    assert time.monotonic() - t0 < FAULT["handshake_timeout_s"] + FAULT["transfer_timeout_s"] + 2
