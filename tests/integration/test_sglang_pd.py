"""kvconnect as SGLang's P/D transfer backend, over real NIXL (UCX on loopback, host memory)
between two spawned processes: a prefill rank (with SGLang's bootstrap server) and a decode rank,
each built from SGLang's real runtime context, KVArgs and the classes ``get_kv_class`` returns for
``kvconnect``, driven through SGLang's ``KVPoll`` state machine (tests/sglang_stubs/pd_harness.py).

NIXL agents run without a progress thread; both ranks are progressed by kvconnect's P/D progress
loops. The shared pair verifies checksums (``verify_checksums``); the fault cases run their own
pairs with short deadlines. Every wait has a deadline.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

pytest.importorskip("sglang", reason="SGLang is not installed")
pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")

from kvconnect.testing.ports import free_port  # noqa: E402
from tests.sglang_stubs import pd_harness as H  # noqa: E402

pytestmark = pytest.mark.integration

FAILED, BOOTSTRAPPING, WAITING, TRANSFERRING, SUCCESS = 0, 1, 2, 3, 4
START_S = 180.0  # a cold SGLang import on this machine can take a minute
STEP_S = 30.0
BASE_ENV = {
    "UCX_NET_DEVICES": "lo",
    "UCX_LOG_LEVEL": "error",
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "15",
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "2",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "1",
}


class Pair:
    """A prefill and a decode rank in two spawned processes."""

    def __init__(self, env: dict | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.port = free_port()
        e = {**BASE_ENV, **(env or {})}
        self.q = {r: (ctx.Queue(), ctx.Queue()) for r in ("prefill", "decode")}
        self.killed: set[str] = set()
        self.p = {
            r: ctx.Process(target=H.serve, args=(r, self.port, e, *self.q[r]), daemon=True) for r in self.q
        }
        # Both import SGLang at once; the decode rank asks the bootstrap server only when driven.
        for proc in self.p.values():
            proc.start()
        self.ready_prefill = self.expect("prefill", "ready", START_S)
        self.ready_decode = self.expect("decode", "ready", START_S)

    def send(self, role: str, *cmd) -> None:
        self.q[role][0].put(cmd)

    def expect(self, role: str, kind: str, timeout: float = STEP_S):
        return H.expect(self.q[role][1], kind, timeout)

    def kill(self, role: str, sig=signal.SIGKILL) -> None:
        if sig == signal.SIGKILL:
            self.killed.add(role)  # a deliberate death: close() accepts its exit code
        os.kill(self.p[role].pid, sig)

    def close(self) -> None:
        """Stops both ranks; each the test did not kill must exit with code 0."""
        for role, proc in self.p.items():
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except OSError:
                    pass
                self.send(role, "stop")
        bad = []
        for role, proc in self.p.items():
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
                bad.append(f"{role} did not stop within 15 s")
            elif role not in self.killed and proc.exitcode != 0:
                bad.append(f"{role} exited with {proc.exitcode}")
        assert not bad, "; ".join(bad)


#: Deadlines of the fault cases (a lease outlives a load, as the P/D core wants).
FAULT_CFG = {"backend": "nixl", "handshake_timeout_s": 1.0, "transfer_timeout_s": 2.0, "lease_timeout_s": 4.0}
FAULT_ENV = {"KVCONNECT_SGLANG_CONFIG": json.dumps(FAULT_CFG)}


@pytest.fixture(scope="module")
def pair():
    p = Pair(env={"KVCONNECT_SGLANG_CONFIG": '{"backend": "nixl", "verify_checksums": true}'})
    yield p
    p.close()


def test_get_kv_class_gives_kvconnect_classes_in_a_fresh_process(pair):
    assert pair.ready_prefill[3] == ["KVConnectKVManager", "KVConnectKVBootstrapServer"]
    assert pair.ready_decode[3][0] == "KVConnectKVManager"


@pytest.mark.parametrize("chunks", [1, 3])
def test_pages_arrive_byte_for_byte_through_the_kvpoll_states(pair, chunks):
    room = 1000 + chunks
    src = [3, 4, 5, 6, 10, 11, 40, 41]
    dst = [7, 8, 9, 20, 21, 22, 50, 63]
    # The prefill sender polls once before the decode side starts: a decode registration that
    # arrived first would rightly make its first state WaitingForInput (seen once in CI).
    pair.send("prefill", "prefill", room, src, 2, chunks, STEP_S, False, True)
    pair.expect("prefill", "prefill-polled")
    pair.send("decode", "decode", room, src, dst, 2, STEP_S)
    _, _, p_seen, p_final, p_reason = pair.expect("prefill", "prefill-done")
    _, _, d_seen, d_final, d_reason, same = pair.expect("decode", "decode-done")
    assert p_final == SUCCESS, p_reason
    assert d_final == SUCCESS, d_reason
    assert same, "decode's pages or metadata row differ from what prefill holds"
    assert p_seen[0] == BOOTSTRAPPING and p_seen[-1] == SUCCESS and WAITING in p_seen
    assert p_seen == sorted(p_seen)  # never goes back
    assert d_seen[-1] == SUCCESS and d_seen == sorted(d_seen)


def test_pages_corrupted_after_their_checksum_fail_the_decode_naming_the_checksum(pair):
    room = 1101
    src, dst = [12, 13, 14], [24, 25, 26]
    pair.send("decode", "decode", room, src, dst, 3, STEP_S)
    pair.send("prefill", "prefill", room, src, 3, 1, STEP_S, True, False, True)
    pair.expect("decode", "decode-metadata-sent")
    pair.expect("prefill", "prefill-waiting")
    pair.kill("decode", signal.SIGSTOP)  # loads only after the bytes changed under the checksum
    try:
        pair.send("prefill", "go")
        pair.expect("prefill", "prefill-corrupted")
    finally:
        pair.kill("decode", signal.SIGCONT)
    _, _, seen, final, reason, _ = pair.expect("decode", "decode-done")
    print("decode failure_exception:", reason)
    assert final == FAILED and seen[-1] == FAILED
    assert "KVTransferError" in reason and "checksum mismatch in block(s) [25]" in reason, reason
    pair.expect("prefill", "prefill-done")  # its write ended: the prefill rank frees its pages


def test_prefill_fails_at_the_lease_deadline_when_the_decode_process_is_gone():
    pair = Pair(env=FAULT_ENV)
    try:
        room = 2001
        pair.send("decode", "decode", room, [1, 2], [5, 6], 1, STEP_S)
        pair.send("prefill", "prefill", room, [1, 2], 1, 1, STEP_S, True)
        pair.expect("decode", "decode-metadata-sent")
        pair.expect("prefill", "prefill-waiting")
        pair.kill("decode")
        pair.p["decode"].join(10)
        t0 = time.monotonic()
        pair.send("prefill", "go")
        _, _, seen, final, reason = pair.expect("prefill", "prefill-done")
        assert final == FAILED and seen[-1] == FAILED
        print("prefill failure_exception:", reason)
        assert "KVTransferError" in reason and "kvconnect: lease expired" in reason, reason
        assert time.monotonic() - t0 < FAULT_CFG["lease_timeout_s"] + 3
    finally:
        pair.close()


def test_prefill_fails_at_the_lease_deadline_when_the_decode_stops_progressing():
    pair = Pair(env=FAULT_ENV)
    try:
        room = 3001
        pair.send("decode", "decode", room, [1, 2, 3], [5, 6, 7], 1, STEP_S)
        pair.send("prefill", "prefill", room, [1, 2, 3], 1, 1, STEP_S, True)
        pair.expect("decode", "decode-metadata-sent")
        pair.expect("prefill", "prefill-waiting")
        pair.kill("decode", signal.SIGSTOP)
        t0 = time.monotonic()
        pair.send("prefill", "go")
        _, _, seen, final, reason = pair.expect("prefill", "prefill-done")
        print("prefill failure_exception:", reason)
        assert final == FAILED, (seen, reason)
        assert "lease expired after lease_timeout_s=4s" in reason, reason
        assert time.monotonic() - t0 < FAULT_CFG["lease_timeout_s"] + 3
    finally:
        pair.close()


def test_decode_fails_within_its_deadline_when_the_prefill_dies_after_leasing():
    # SGLang's heartbeat would notice the dead prefill too; slowed down, the load's deadline must
    pair = Pair(env={**FAULT_ENV, "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "60"})
    try:
        # a first request connects prefill's socket to decode's: READY then lands in the kernel's
        # buffer of the stopped decode process (a first contact would wait for its handshake)
        pair.send("prefill", "prefill", 5000, [3, 4], 2, 1, STEP_S)
        pair.send("decode", "decode", 5000, [3, 4], [7, 8], 2, STEP_S)
        assert pair.expect("decode", "decode-done")[3] == SUCCESS
        assert pair.expect("prefill", "prefill-done")[3] == SUCCESS
        room = 5001
        pair.send("decode", "decode", room, [1, 2], [5, 6], 1, STEP_S)
        pair.send("prefill", "prefill", room, [1, 2], 1, 1, STEP_S, True)
        pair.expect("decode", "decode-metadata-sent")
        pair.expect("prefill", "prefill-waiting")
        pair.kill("decode", signal.SIGSTOP)  # READY waits in its socket; the load starts after
        try:
            pair.send("prefill", "go")
            pair.expect("prefill", "prefill-sent")
            time.sleep(0.2)  # READY flushed into the decode's socket
            pair.kill("prefill")
            pair.p["prefill"].join(10)
        finally:
            pair.kill("decode", signal.SIGCONT)
        t0 = time.monotonic()
        _, _, seen, final, reason, _ = pair.expect("decode", "decode-done")
        print("decode failure_exception:", reason)
        assert final == FAILED and seen[-1] == FAILED
        assert "KVTransferError" in reason and "kvconnect: " in reason, reason
        assert time.monotonic() - t0 < FAULT_CFG["handshake_timeout_s"] + FAULT_CFG["transfer_timeout_s"] + 3
    finally:
        pair.close()


def test_decode_fails_clearly_when_the_prefill_process_is_gone():
    pair = Pair()
    try:
        room = 4001
        pair.send("decode", "decode", room, [1, 2], [5, 6], 1, STEP_S)
        pair.send("prefill", "prefill", room, [1, 2], 1, 1, STEP_S, True)
        pair.expect("decode", "decode-metadata-sent")
        pair.expect("prefill", "prefill-waiting")
        pair.kill("prefill")
        _, _, seen, final, reason, _ = pair.expect("decode", "decode-done")
        assert final == FAILED and seen[-1] == FAILED
        print("decode failure_exception:", reason)
        assert "KVTransferError" in reason and ("prefill" in reason or "timed out" in reason), reason
    finally:
        pair.close()
