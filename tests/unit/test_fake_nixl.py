"""The fake NIXL agent's knobs: timing, failures, lost notifications, dead and stopped peers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import fake_nixl
from tests.fakes.fake_nixl import FakeNixlAgent, FakeNixlKnobs, nixl_agent_config

pytestmark = pytest.mark.unit

BLOCK = 1024
N = 4


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    fake_nixl.registry.reset()


class Pair:
    """Initiator 'i' (zeros) reading from target 't' (pattern); prepared lists lh / rh."""

    def __init__(self, knobs=None, prog_thread=True, notif=b"n"):
        conf = nixl_agent_config(enable_prog_thread=prog_thread)
        self.i = FakeNixlAgent("i", conf, knobs=knobs)
        self.t = FakeNixlAgent("t", nixl_agent_config(enable_prog_thread=prog_thread))
        self.ib = np.zeros(N * BLOCK, np.uint8)
        self.tb = (np.arange(N * BLOCK) % 250 + 1).astype(np.uint8)
        self.i.register_memory([(self.ib.ctypes.data, self.ib.nbytes, 0, "")], "DRAM")
        self.t.register_memory([(self.tb.ctypes.data, self.tb.nbytes, 0, "")], "DRAM")
        self.i.add_remote_agent(self.t.get_agent_metadata())
        rows = lambda buf: [(buf.ctypes.data + k * BLOCK, BLOCK, 0) for k in range(N)]  # noqa: E731
        self.lh = self.i.prep_xfer_dlist("", rows(self.ib), "DRAM")
        self.rh = self.i.prep_xfer_dlist("t", rows(self.tb), "DRAM")
        self.notif = notif

    def xfer(self, op="READ", idx=(0, 1)):
        return self.i.make_prepped_xfer(op, self.lh, list(idx), self.rh, list(idx), notif_msg=self.notif)

    def copied(self, k: int) -> bool:
        return bool(
            np.array_equal(self.ib[k * BLOCK : (k + 1) * BLOCK], self.tb[k * BLOCK : (k + 1) * BLOCK])
        )


def test_default_completes_in_transfer_call_and_notifies():
    p = Pair()
    h = p.xfer()
    assert p.i.transfer(h) == "DONE"
    assert p.i.check_xfer_state(h) == "DONE"
    assert p.copied(0) and p.copied(1) and not p.copied(2)
    assert p.t.get_new_notifs() == {"i": [b"n"]}
    assert p.t.get_new_notifs() == {}


def test_write_copies_to_target():
    p = Pair()
    p.ib[:BLOCK] = 200
    h = p.xfer("WRITE", idx=[0])
    assert p.i.transfer(h) == "DONE"
    assert (p.tb[:BLOCK] == 200).all()


def test_cycles_before_done_and_no_bytes_before_done():
    p = Pair(FakeNixlKnobs(cycles_before_done=3))
    h = p.xfer()
    assert p.i.transfer(h) == "PROC"
    assert [p.i.check_xfer_state(h) for _ in range(3)] == ["PROC"] * 3
    assert not p.copied(0)  # data lands only at completion
    assert p.t.get_new_notifs() == {}
    assert p.i.check_xfer_state(h) == "DONE"
    assert p.copied(0) and p.t.get_new_notifs() == {"i": [b"n"]}


def test_fail_count_tears_transfer_and_sends_no_notif():
    p = Pair(FakeNixlKnobs(fail_transfers=1))
    h = p.xfer(idx=[0, 1])
    assert p.i.transfer(h) == "ERR"
    assert p.i.check_xfer_state(h) == "ERR"
    assert p.copied(0) and not p.copied(1)  # torn: first half only
    assert p.t.get_new_notifs() == {}
    h2 = p.xfer(idx=[2])
    assert p.i.transfer(h2) == "DONE"  # the count is used up


def test_fail_predicate():
    p = Pair(FakeNixlKnobs(fail_transfers=lambda h: h.op == "WRITE"))
    assert p.i.transfer(p.xfer("READ")) == "DONE"
    assert p.i.transfer(p.xfer("WRITE")) == "ERR"


def test_lose_notifs():
    p = Pair(FakeNixlKnobs(lose_notifs=1))
    assert p.i.transfer(p.xfer(idx=[0])) == "DONE"
    assert p.copied(0) and p.t.get_new_notifs() == {}
    p.i.send_notif("t", "hello")
    assert p.t.get_new_notifs() == {"i": [b"hello"]}
    p.i.knobs.lose_notifs = True
    p.i.send_notif("t", b"gone")
    assert p.t.get_new_notifs() == {}


def test_killed_peer_before_post_raises_disconnect():
    p = Pair()
    h = p.xfer()
    p.t.kill()
    with pytest.raises(fake_nixl.nixlRemoteDisconnectError):
        p.i.transfer(h)
    with pytest.raises(fake_nixl.nixlRemoteDisconnectError):
        p.i.send_notif("t", b"x")
    assert not p.copied(0)


def test_peer_dying_in_flight_makes_check_raise_every_time():
    p = Pair(FakeNixlKnobs(cycles_before_done=5))
    h = p.xfer()
    assert p.i.transfer(h) == "PROC"
    p.t.kill()
    for _ in range(2):
        with pytest.raises(fake_nixl.nixlRemoteDisconnectError):
            p.i.check_xfer_state(h)
    p.i.release_xfer_handle(h)


def test_peer_gone_knob_by_name():
    p = Pair(FakeNixlKnobs(peer_gone={"t"}))
    with pytest.raises(fake_nixl.nixlRemoteDisconnectError):
        p.i.transfer(p.xfer())
    p.i.knobs.peer_gone = False
    assert p.i.transfer(p.xfer()) == "DONE"


def test_restarted_peer_with_same_name_is_a_different_peer():
    p = Pair()
    h = p.xfer()
    p.t.kill()
    FakeNixlAgent("t")  # a new process took the name; we still hold the old one's metadata
    with pytest.raises(fake_nixl.nixlRemoteDisconnectError):
        p.i.transfer(h)


def test_stopped_peer_stays_proc_until_resumed_and_release_cancels():
    p = Pair()
    p.t.stop()
    h = p.xfer(idx=[0])
    assert p.i.transfer(h) == "PROC"
    assert all(p.i.check_xfer_state(h) == "PROC" for _ in range(50))
    p.t.resume()
    assert p.i.check_xfer_state(h) == "DONE" and p.copied(0)

    p.i.knobs.peer_stopped = True
    h2 = p.xfer(idx=[1])
    assert p.i.transfer(h2) == "PROC"
    p.i.release_xfer_handle(h2)  # cancels; no raise
    p.i.knobs.peer_stopped = False
    assert not p.copied(1)
    with pytest.raises(fake_nixl.nixlInvalidParamError):  # stricter than real: released handle
        p.i.check_xfer_state(h2)


def test_without_progress_thread_target_must_be_progressed():
    p = Pair(prog_thread=False)
    h = p.xfer(idx=[0])
    assert p.i.transfer(h) == "PROC"
    assert all(p.i.check_xfer_state(h) == "PROC" for _ in range(10))
    with pytest.raises(fake_nixl.nixlRepostActiveError):
        p.i.transfer(h)
    assert p.t.get_new_notifs() == {}
    assert p.i.check_xfer_state(h) == "DONE"
    assert p.t.get_new_notifs() == {"i": [b"n"]}


def test_first_contact_notif_waits_for_sender_progress_without_progress_thread():
    p = Pair(prog_thread=False)
    p.i.send_notif("t", b"hi")
    assert p.t.get_new_notifs() == {}
    assert p.i.get_new_notifs() == {}  # progresses the sender
    assert p.t.get_new_notifs() == {"i": [b"hi"]}
    p.i.send_notif("t", b"again")
    assert p.t.get_new_notifs() == {"i": [b"again"]}


def test_remove_remote_agent_makes_handles_stale_and_reload_does_not():
    p = Pair()
    h = p.xfer()
    p.i.add_remote_agent(p.t.get_agent_metadata())
    assert p.i.transfer(h) == "DONE"
    p.i.remove_remote_agent("t")
    with pytest.raises(fake_nixl.nixlNotFoundError):
        p.i.transfer(h)
    p.i.add_remote_agent(p.t.get_agent_metadata())
    with pytest.raises(fake_nixl.nixlNotFoundError):  # lists prepared before the removal
        p.i.make_prepped_xfer("READ", p.lh, [0], p.rh, [0])


def test_metadata_round_trip_and_garbage():
    a = FakeNixlAgent("a")
    assert a.add_remote_agent(FakeNixlAgent("b").get_agent_metadata()) == b"b"
    for bad in (b"", b"junk", b"FAKENIXL\x01{", b"FAKENIXL\x01{}"):
        with pytest.raises(fake_nixl.nixlMismatchError):
            a.add_remote_agent(bad)


def test_torch_tensor_forms():
    torch = pytest.importorskip("torch")
    a = FakeNixlAgent("a")
    t = torch.zeros(2, 8)
    reg = a.register_memory(t)
    assert reg.descCount() == 1 and reg[0] == (t.data_ptr(), 64, 0, b"")
    assert a.get_xfer_descs([t[0], t[1]]).descCount() == 2
    assert a.get_xfer_descs(t.t()) is None  # not contiguous
    a.prep_xfer_dlist("", [t[0], t[1]])


def test_strided_prep_and_telemetry():
    knobs = FakeNixlKnobs()
    p = Pair(knobs)
    i2 = FakeNixlAgent("i2", nixl_agent_config(capture_telemetry=True))
    i2.register_memory([(p.ib.ctypes.data, p.ib.nbytes, 0, "")], "DRAM")
    i2.add_remote_agent(p.t.get_agent_metadata())
    strided = np.array([[p.ib.ctypes.data, BLOCK, 0, BLOCK, N]], dtype=np.uint64)
    lh = i2.prep_xfer_dlist("", strided, "DRAM")
    rh = i2.prep_xfer_dlist("t", np.array([[p.tb.ctypes.data, BLOCK, 0, BLOCK, N]], dtype=np.uint64), "DRAM")
    h = i2.make_prepped_xfer("READ", lh, [0, 1, 3], rh, [0, 1, 3])
    assert i2.transfer(h) == "DONE"
    tel = i2.get_xfer_telemetry(h)
    assert tel.totalBytes == 3 * BLOCK and tel.descCount == 2
    with pytest.raises(fake_nixl.nixlNoTelemetryError):
        p.i.get_xfer_telemetry(h)
    with pytest.raises(ValueError):
        i2.prep_xfer_dlist("", strided)
