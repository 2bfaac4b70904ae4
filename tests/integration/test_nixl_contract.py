"""Contract: the same cases against tests/fakes/fake_nixl.py and against real NIXL (nixl-cu12).

Real NIXL runs UCX over loopback on host memory with ``enable_prog_thread=False``, so the target
agent must be progressed (``get_new_notifs``) while the initiator polls. Two real agents in one
process transfer to each other, so the contract cases are in-process. The dead/stopped peer cases
need a second process: they run in a spawned driver process (a UCX assertion can fire at exit of
a process whose peer was killed, and it must not take pytest with it) that spawns the peer.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import signal
import time
import uuid

import numpy as np
import pytest

from tests.fakes import fake_nixl

os.environ.setdefault("UCX_NET_DEVICES", "lo")

POLL_S = 0.001
DEADLINE_S = 10.0
BLOCK = 4096
NBLOCKS = 8


def _real_modules():
    api = pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
    from nixl_cu12 import _bindings

    return api, _bindings


class Side:
    """One agent plus a host buffer of NBLOCKS blocks registered with it."""

    def __init__(self, agent, fill: int | None = None):
        self.agent = agent
        self.buf = np.zeros(NBLOCKS * BLOCK, dtype=np.uint8)
        if fill is not None:
            self.buf[:] = (np.arange(self.buf.size) * 7 + fill) % 251
        self.reg = agent.register_memory([(self.addr, self.buf.nbytes, 0, "")], "DRAM")

    @property
    def addr(self) -> int:
        return self.buf.ctypes.data

    def rows(self) -> list[tuple[int, int, int]]:
        return [(self.addr + i * BLOCK, BLOCK, 0) for i in range(NBLOCKS)]

    def block(self, i: int) -> np.ndarray:
        return self.buf[i * BLOCK : (i + 1) * BLOCK]


class Env:
    """What a case needs: a way to make agents, and the error classes of that implementation."""

    def __init__(self, kind: str):
        self.kind = kind
        self._agents = []
        if kind == "real":
            api, errors = _real_modules()
            self._agent_cls, self._config_cls, self.errors = api.nixl_agent, api.nixl_agent_config, errors
        else:
            self._agent_cls, self._config_cls, self.errors = (
                fake_nixl.FakeNixlAgent,
                fake_nixl.nixl_agent_config,
                fake_nixl,
            )

    def agent(self, prefix: str, exact_name: bool = False, **conf):
        conf.setdefault("enable_prog_thread", False)
        conf.setdefault("backends", ["UCX"])
        name = prefix if exact_name else f"{prefix}-{uuid.uuid4().hex[:8]}"
        ag = self._agent_cls(name, self._config_cls(**conf))
        self._agents.append(ag)
        return ag

    def pair(self, **conf) -> tuple[Side, Side]:
        """Initiator (zeros) and target (pattern), the target's metadata loaded by the initiator."""
        init = Side(self.agent("init", **conf))
        targ = Side(self.agent("targ"), fill=3)
        name = init.agent.add_remote_agent(targ.agent.get_agent_metadata())
        assert name == targ.agent.name.encode()  # real NIXL returns bytes, not str
        return init, targ


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.integration)])
def env(request):
    e = Env(request.param)
    yield e
    _pending.clear()
    if request.param == "fake":
        fake_nixl.registry.reset()


def wait_done(init, handle, targ, deadline_s: float = DEADLINE_S) -> str:
    """Poll the initiator and progress the target until the transfer leaves PROC or time is up.

    init and targ are agents or Sides. Notifications the target receives meanwhile are kept in
    ``_pending`` so that wait_notifs still sees them.
    """
    ia = init.agent if isinstance(init, Side) else init
    ta = targ.agent if isinstance(targ, Side) else targ
    end = time.monotonic() + deadline_s
    while True:
        state = ia.check_xfer_state(handle)
        if state != "PROC" or time.monotonic() > end:
            return state
        for k, v in ta.get_new_notifs().items():
            _pending.setdefault(ta.name, {}).setdefault(k, []).extend(v)
        time.sleep(POLL_S)


_pending: dict[str, dict[str, list[bytes]]] = {}


def wait_notifs(agent, want: int, deadline_s: float = DEADLINE_S, progress=()) -> dict[str, list[bytes]]:
    """Collect ``want`` notifications on ``agent``, also progressing the agents in ``progress``."""
    got = _pending.pop(agent.name, {})
    end = time.monotonic() + deadline_s
    while sum(len(v) for v in got.values()) < want and time.monotonic() < end:
        for other in progress:
            assert other.get_new_notifs() == {}
        for k, v in agent.get_new_notifs().items():
            got.setdefault(k, []).extend(v)
        time.sleep(POLL_S)
    return got


def _run(init, targ, op, lidx, ridx, notif=b"", expect="DONE"):
    lh = init.agent.prep_xfer_dlist("NIXL_INIT_AGENT", init.rows(), "DRAM")
    rh = init.agent.prep_xfer_dlist(targ.agent.name, targ.rows(), "DRAM")
    h = init.agent.make_prepped_xfer(op, lh, lidx, rh, ridx, notif_msg=notif)
    assert init.agent.transfer(h) in ("DONE", "PROC")
    assert wait_done(init, h, targ) == expect
    return h, lh, rh


# ---------------------------------------------------------------- contract cases (fake and real)


def test_read_and_write_move_bytes_and_notify(env):
    init, targ = env.pair()
    h, lh, rh = _run(init, targ, "READ", [0, 2, 4], [1, 3, 5], notif=b"read-1")
    for li, ri in zip([0, 2, 4], [1, 3, 5]):
        assert np.array_equal(init.block(li), targ.block(ri))
    assert not init.block(1).any()
    assert wait_notifs(targ.agent, 1) == {init.agent.name: [b"read-1"]}
    init.agent.release_xfer_handle(h)

    init.block(6)[:] = 11
    init.block(7)[:] = 12
    h = init.agent.make_prepped_xfer(
        "WRITE", lh, np.array([6, 7], np.int32), rh, np.array([0, 1], np.int32), "w"
    )
    assert init.agent.transfer(h) in ("DONE", "PROC")
    assert wait_done(init, h, targ) == "DONE"
    assert (targ.block(0) == 11).all() and (targ.block(1) == 12).all()
    assert wait_notifs(targ.agent, 1) == {init.agent.name: [b"w"]}  # str notif arrives as bytes

    # a finished handle can be posted again, with a new notification
    assert init.agent.transfer(h, b"again") in ("DONE", "PROC")
    assert wait_done(init, h, targ) == "DONE"
    assert wait_notifs(targ.agent, 1) == {init.agent.name: [b"again"]}
    init.agent.release_xfer_handle(h)
    init.agent.release_xfer_handle(h)  # idempotent
    init.agent.release_dlist_handle(lh)
    init.agent.release_dlist_handle(rh)
    assert targ.agent.get_new_notifs() == {}


def test_whole_range_contiguous_read(env):
    init, targ = env.pair()
    _run(init, targ, "READ", list(range(NBLOCKS)), list(range(NBLOCKS)))
    assert np.array_equal(init.buf, targ.buf)


def test_torch_tensors_register_and_transfer(env):
    torch = pytest.importorskip("torch")
    a, b = env.agent("ta"), env.agent("tb")
    src = torch.arange(4 * 256, dtype=torch.float32).reshape(4, 256)
    dst = torch.zeros(4, 256, dtype=torch.float32)
    b.register_memory(src)
    reg = a.register_memory([dst])
    assert reg.descCount() == 1
    assert a.get_xfer_descs(dst).descCount() == 1
    a.add_remote_agent(b.get_agent_metadata())
    lh = a.prep_xfer_dlist("", [dst[i] for i in range(4)])
    rh = a.prep_xfer_dlist(b.name, [src[i] for i in range(4)])
    h = a.make_prepped_xfer("READ", lh, [0, 1, 2, 3], rh, [3, 2, 1, 0])
    a.transfer(h)
    assert wait_done(a, h, b) == "DONE"
    assert torch.equal(dst, src.flip(0))


def test_unregistered_and_bad_descriptors_raise_at_once(env):
    init, targ = env.pair()
    E, a = env.errors, init.agent
    outside = np.zeros(BLOCK, np.uint8)
    with pytest.raises(E.nixlNotFoundError):
        a.prep_xfer_dlist("", [(outside.ctypes.data, 16, 0)], "DRAM")
    with pytest.raises(E.nixlNotFoundError):  # runs past the end of the registration
        a.prep_xfer_dlist("", [(init.addr + init.buf.nbytes - 8, 16, 0)], "DRAM")
    with pytest.raises(E.nixlNotFoundError):  # another device id
        a.prep_xfer_dlist("", [(init.addr, 16, 1)], "DRAM")
    with pytest.raises(E.nixlNotFoundError):
        a.prep_xfer_dlist("no-such-agent", [(targ.addr, 16, 0)], "DRAM")
    with pytest.raises(E.nixlNotFoundError):
        a.prep_xfer_dlist(targ.agent.name, [(outside.ctypes.data, 16, 0)], "DRAM")

    lh = a.prep_xfer_dlist("", init.rows(), "DRAM")
    rh = a.prep_xfer_dlist(targ.agent.name, targ.rows(), "DRAM")
    half = a.prep_xfer_dlist(targ.agent.name, [(targ.addr, BLOCK // 2, 0)], "DRAM")
    for li, ri, hr in [
        ([0, NBLOCKS], [0, 1], rh),  # index out of range
        ([-1], [0], rh),  # negative index
        ([0, 1], [0], rh),  # count mismatch
        ([], [], rh),  # empty
        ([0], [0], half),  # length mismatch
    ]:
        with pytest.raises(E.nixlInvalidParamError):
            a.make_prepped_xfer("READ", lh, li, hr, ri)
    with pytest.raises(E.nixlInvalidParamError):  # sides swapped
        a.make_prepped_xfer("READ", rh, [0], lh, [0])
    with pytest.raises(KeyError):
        a.make_prepped_xfer("COPY", lh, [0], rh, [0])


def test_garbage_metadata_raises_mismatch(env):
    a, b = env.agent("a"), env.agent("b")
    md = b.get_agent_metadata()
    assert isinstance(md, bytes)
    for bad in (b"garbage bytes here", b"", md[: len(md) // 4]):
        with pytest.raises(env.errors.nixlMismatchError):
            a.add_remote_agent(bad)


def test_descriptor_list_forms(env):
    a = env.agent("a")
    buf = np.zeros(BLOCK, np.uint8)
    assert a.get_xfer_descs([(buf.ctypes.data, 16, 0)]) is None  # no memory type: None, no raise
    assert a.get_xfer_descs([(buf.ctypes.data, 16, 0, "")], "DRAM") is None  # 4-tuple for transfer
    assert a.get_reg_descs([(buf.ctypes.data, 16, 0)], "DRAM") is None  # 3-tuple for registration
    # a transfer list of memory nobody registered is built fine; preparing it is what fails
    assert a.get_xfer_descs([(buf.ctypes.data, 16, 0)], "DRAM").descCount() == 1
    with pytest.raises(env.errors.nixlNotFoundError):
        a.prep_xfer_dlist("", [(buf.ctypes.data, 16, 0)], "DRAM")
    with pytest.raises(TypeError):
        a.register_memory([(buf.ctypes.data, 16, 0)], "DRAM")
    reg = a.register_memory(np.array([[buf.ctypes.data, buf.nbytes, 0]], dtype=np.uint64), "DRAM")
    assert reg.descCount() == 1 and reg[0][:3] == (buf.ctypes.data, buf.nbytes, 0)
    a.prep_xfer_dlist("", [(buf.ctypes.data, 16, 0)], "DRAM")
    a.deregister_memory(reg)


def test_metadata_is_a_snapshot_and_reload_keeps_lists(env):
    init, targ = env.pair()
    late = np.full(BLOCK, 9, np.uint8)
    targ.agent.register_memory([(late.ctypes.data, BLOCK, 0, "")], "DRAM")
    with pytest.raises(env.errors.nixlNotFoundError):
        init.agent.prep_xfer_dlist(targ.agent.name, [(late.ctypes.data, BLOCK, 0)], "DRAM")
    lh = init.agent.prep_xfer_dlist("", init.rows(), "DRAM")
    rh = init.agent.prep_xfer_dlist(targ.agent.name, targ.rows(), "DRAM")
    init.agent.add_remote_agent(targ.agent.get_agent_metadata())  # fresh metadata, same agent
    late_h = init.agent.prep_xfer_dlist(targ.agent.name, [(late.ctypes.data, BLOCK, 0)], "DRAM")
    h = init.agent.make_prepped_xfer("READ", lh, [0], late_h, [0])
    init.agent.transfer(h)
    assert wait_done(init, h, targ) == "DONE" and (init.block(0) == 9).all()
    h = init.agent.make_prepped_xfer("READ", lh, [1], rh, [1])  # list from before the reload
    init.agent.transfer(h)
    assert wait_done(init, h, targ) == "DONE"
    assert np.array_equal(init.block(1), targ.block(1))


def test_remove_remote_agent_makes_lists_stale(env):
    init, targ = env.pair()
    h, lh, rh = _run(init, targ, "READ", [0], [0])
    init.agent.remove_remote_agent(targ.agent.name)
    assert init.agent.check_xfer_state(h) == "DONE"
    with pytest.raises(env.errors.nixlNotFoundError):
        init.agent.transfer(h)
    with pytest.raises(env.errors.nixlNotFoundError):
        init.agent.make_prepped_xfer("READ", lh, [0], rh, [0])
    with pytest.raises(env.errors.nixlNotFoundError):
        init.agent.prep_xfer_dlist(targ.agent.name, targ.rows(), "DRAM")
    init.agent.remove_remote_agent(targ.agent.name)  # twice: no error
    init.agent.remove_remote_agent("never-known")


def test_restarted_agent_under_a_loaded_name_is_refused_until_removed(env):
    # Why kvconnect names each worker's agent afresh at every start: a peer that comes back under
    # the name of its earlier incarnation cannot be loaded while that one is.
    init, targ = env.pair()
    again = Side(env.agent(targ.agent.name, exact_name=True), fill=5)
    init.agent.add_remote_agent(targ.agent.get_agent_metadata())  # the same agent again: fine
    with pytest.raises(env.errors.nixlNotAllowedError):
        init.agent.add_remote_agent(again.agent.get_agent_metadata())
    init.agent.remove_remote_agent(targ.agent.name)
    assert init.agent.add_remote_agent(again.agent.get_agent_metadata()) == again.agent.name.encode()
    _run(init, again, "READ", [2], [2])
    assert np.array_equal(init.block(2), again.block(2))


def test_target_that_is_not_progressed_keeps_transfer_proc(env):
    init, targ = env.pair()
    lh = init.agent.prep_xfer_dlist("", init.rows(), "DRAM")
    rh = init.agent.prep_xfer_dlist(targ.agent.name, targ.rows(), "DRAM")
    h = init.agent.make_prepped_xfer("READ", lh, [0], rh, [0], notif_msg=b"n")
    assert init.agent.transfer(h) == "PROC"
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        assert init.agent.check_xfer_state(h) == "PROC"
        time.sleep(0.01)
    with pytest.raises(env.errors.nixlRepostActiveError):
        init.agent.transfer(h)
    assert wait_done(init, h, targ) == "DONE"
    assert np.array_equal(init.block(0), targ.block(0))


def test_release_of_a_proc_transfer_does_not_raise(env):
    init, targ = env.pair()
    lh = init.agent.prep_xfer_dlist("", init.rows(), "DRAM")
    rh = init.agent.prep_xfer_dlist(targ.agent.name, targ.rows(), "DRAM")
    h = init.agent.make_prepped_xfer("READ", lh, [0], rh, [0])
    assert init.agent.transfer(h) == "PROC"
    init.agent.release_xfer_handle(h)


def test_standalone_notification_needs_sender_progress_on_first_contact(env):
    init, targ = env.pair()
    init.agent.send_notif(targ.agent.name, b"ping")
    assert wait_notifs(targ.agent, 1, deadline_s=0.2) == {}  # the sender was never progressed
    assert wait_notifs(targ.agent, 1, progress=[init.agent]) == {init.agent.name: [b"ping"]}
    init.agent.send_notif(targ.agent.name, b"pong")  # connected now: goes out by itself
    assert wait_notifs(targ.agent, 1) == {init.agent.name: [b"pong"]}
    with pytest.raises(env.errors.nixlNotFoundError):
        init.agent.send_notif("never-known", b"x")
    with pytest.raises(env.errors.nixlNotFoundError):  # the target never loaded our metadata
        targ.agent.send_notif(init.agent.name, b"x")
    assert targ.agent.get_new_notifs() == {}


def test_telemetry(env):
    init, targ = env.pair(capture_telemetry=True)
    h, _, _ = _run(init, targ, "READ", [0, 1], [2, 3])
    tel = init.agent.get_xfer_telemetry(h)
    assert tel.totalBytes == 2 * BLOCK
    assert tel.descCount == 1  # both sides contiguous: merged
    assert tel.xferDuration >= 0
    quiet, other = env.pair()
    h, _, _ = _run(quiet, other, "READ", [0], [0])
    with pytest.raises(env.errors.nixlNoTelemetryError):
        quiet.agent.get_xfer_telemetry(h)


def test_loopback_and_initialize_xfer(env):
    init, targ = env.pair()
    a = init.agent
    loop = a.prep_xfer_dlist(a.name, init.rows(), "DRAM")
    lh = a.prep_xfer_dlist("", init.rows(), "DRAM")
    init.block(0)[:] = 77
    h = a.make_prepped_xfer("WRITE", lh, [0], loop, [5])
    a.transfer(h)
    assert wait_done(init, h, init) == "DONE" and (init.block(5) == 77).all()

    ld = a.get_xfer_descs([(init.addr, BLOCK, 0)], "DRAM")
    rd = a.get_xfer_descs([(targ.addr + 2 * BLOCK, BLOCK, 0)], "DRAM")
    h = a.initialize_xfer("READ", ld, rd, targ.agent.name, b"init")
    a.transfer(h)
    assert wait_done(init, h, targ) == "DONE"
    assert np.array_equal(init.block(0), targ.block(2))
    assert wait_notifs(targ.agent, 1) == {a.name: [b"init"]}
    with pytest.raises(env.errors.nixlNotFoundError):
        a.initialize_xfer("READ", ld, rd, "never-known")
    outside = np.zeros(BLOCK, np.uint8)
    with pytest.raises(env.errors.nixlNotFoundError):
        a.initialize_xfer(
            "READ", a.get_xfer_descs([(outside.ctypes.data, BLOCK, 0)], "DRAM"), rd, targ.agent.name
        )
    with pytest.raises(env.errors.nixlInvalidParamError):  # lengths are checked first
        a.initialize_xfer(
            "READ", a.get_xfer_descs([(outside.ctypes.data, 16, 0)], "DRAM"), rd, targ.agent.name
        )


# ---------------------------------------------------------------- the fake's surface


_MIRRORED = [
    "__init__", "get_reg_descs", "register_memory", "deregister_memory", "get_xfer_descs",
    "prep_xfer_dlist", "make_prepped_xfer", "initialize_xfer", "transfer", "check_xfer_state",
    "get_xfer_telemetry", "get_agent_metadata", "add_remote_agent", "remove_remote_agent",
    "check_remote_metadata", "make_connection", "send_notif", "get_new_notifs", "update_notifs",
    "check_remote_xfer_done", "release_xfer_handle", "release_dlist_handle", "query_xfer_backend",
]  # fmt: skip


@pytest.mark.integration
def test_fake_mirrors_real_signatures_and_error_names():
    api, bindings = _real_modules()

    def params(fn):
        return [(p.name, p.default, p.kind) for p in inspect.signature(fn).parameters.values()]

    for name in _MIRRORED:
        real, fake = params(getattr(api.nixl_agent, name)), params(getattr(fake_nixl.FakeNixlAgent, name))
        assert fake[: len(real)] == real, name
        assert all(p[2] == inspect.Parameter.KEYWORD_ONLY for p in fake[len(real) :]), name
    assert params(fake_nixl.nixl_agent_config.__init__) == params(api.nixl_agent_config.__init__)
    real_errors = {n for n in dir(bindings) if n.startswith("nixl") and n.endswith("Error")}
    assert real_errors and real_errors <= set(dir(fake_nixl))
    assert fake_nixl.DEFAULT_COMM_PORT == bindings.DEFAULT_COMM_PORT
    assert fake_nixl.NIXL_INIT_AGENT == bindings.NIXL_INIT_AGENT


# ---------------------------------------------------------------- real two-process peer cases


def _peer_main(conn, nbytes: int) -> None:
    """A peer process: registers a patterned buffer, sends its metadata, and progresses itself."""
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    ag = nixl_agent("peer", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    buf = np.full(nbytes, 5, dtype=np.uint8)
    ag.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    conn.send((ag.get_agent_metadata(), buf.ctypes.data))
    end = time.monotonic() + 120
    while time.monotonic() < end:
        ag.get_new_notifs()
        if conn.poll(0.001) and conn.recv() == "stop":
            break


def _driver_main(conn, scenario: str) -> None:
    """Runs in its own process: spawns a peer, warms the connection, then hurts the peer."""
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from nixl_cu12 import _bindings
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    ctx = mp.get_context("spawn")
    nbytes, nblk = 1 << 20, 64
    ours, theirs = ctx.Pipe()
    peer = ctx.Process(target=_peer_main, args=(theirs, nbytes), daemon=True)
    peer.start()
    result: dict = {}
    try:
        if not ours.poll(60):
            raise TimeoutError("peer did not start within 60 s")
        md, raddr = ours.recv()
        ag = nixl_agent("driver", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        buf = np.zeros(nbytes, dtype=np.uint8)
        ag.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
        ag.add_remote_agent(md)
        bs = nbytes // nblk
        lh = ag.prep_xfer_dlist("", [(buf.ctypes.data + i * bs, bs, 0) for i in range(nblk)], "DRAM")
        rh = ag.prep_xfer_dlist("peer", [(raddr + i * bs, bs, 0) for i in range(nblk)], "DRAM")
        idx = list(range(nblk))

        def poll(h, deadline_s):
            end = time.monotonic() + deadline_s
            state = "PROC"
            while state == "PROC" and time.monotonic() < end:
                state = ag.check_xfer_state(h)
                if state == "PROC":
                    time.sleep(POLL_S)
            return state

        def outcome(fn):
            t0 = time.monotonic()
            try:
                value = fn()
            except _bindings.nixlRemoteDisconnectError:
                value = "nixlRemoteDisconnectError"
            except Exception as e:  # reported, and the test names it
                value = f"{type(e).__name__}: {e}"
            return value, time.monotonic() - t0

        warm = ag.make_prepped_xfer("READ", lh, idx, rh, idx, notif_msg=b"warm")
        ag.transfer(warm)
        result["warm"] = poll(warm, DEADLINE_S)
        result["warm_bytes_ok"] = bool((buf == 5).all())
        ag.release_xfer_handle(warm)

        if scenario == "killed_before":
            peer.kill()
            peer.join(10)
            h = ag.make_prepped_xfer("READ", lh, idx, rh, idx, notif_msg=b"x")
            result["transfer"], result["transfer_s"] = outcome(lambda: ag.transfer(h))
            result["check"], _ = outcome(lambda: ag.check_xfer_state(h))
            ag.release_xfer_handle(h)
            # Measured: a process that exits right after a post failed on a dead peer aborts in UCX's
            # teardown about half the time (arbiter assertion, SIGABRT), with or without removing the
            # peer's agent; progressing the agent for a moment first (as kvconnect's progress thread
            # always does) purges the dead endpoint's queue, and then it exits cleanly (22 of 22) --
            # which _drive checks. kvconnect also drops a dead peer, as here.
            ag.remove_remote_agent("peer")
            for _ in range(50):
                ag.get_new_notifs()
                time.sleep(0.005)
        elif scenario in ("stopped", "killed_during"):
            os.kill(peer.pid, signal.SIGSTOP)
            h = ag.make_prepped_xfer("READ", lh, idx, rh, idx, notif_msg=b"x")
            result["posted"] = ag.transfer(h)
            result["after_stop"], result["after_stop_s"] = outcome(lambda: poll(h, 0.5))
            if scenario == "killed_during":
                os.kill(peer.pid, signal.SIGKILL)
                result["after_kill"], result["after_kill_s"] = outcome(lambda: poll(h, DEADLINE_S))
            else:
                result["released"], _ = outcome(lambda: ag.release_xfer_handle(h))
                os.kill(peer.pid, signal.SIGCONT)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if peer.is_alive():
            peer.kill()
        peer.join(10)
        conn.send(result)


def _drive(scenario: str) -> dict:
    _real_modules()
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    driver = ctx.Process(target=_driver_main, args=(theirs, scenario))
    driver.start()
    try:
        assert ours.poll(120), "driver process gave no result within 120 s"
        result = ours.recv()
    finally:
        driver.join(30)
        if driver.is_alive():
            driver.kill()
            driver.join(10)
    # the driver's own peer was hurt on purpose; the driver itself must still exit cleanly
    assert driver.exitcode == 0, f"driver process exited with {driver.exitcode} ({result})"
    return result


@pytest.mark.integration
def test_real_peer_killed_before_transfer_raises_disconnect_fast():
    r = _drive("killed_before")
    assert r.get("error") is None, r
    assert r["warm"] == "DONE" and r["warm_bytes_ok"], r
    assert r["transfer"] == "nixlRemoteDisconnectError", r
    assert r["transfer_s"] < 1.0, r
    assert r["check"] == "nixlRemoteDisconnectError", r


@pytest.mark.integration
def test_real_peer_killed_during_transfer_raises_disconnect_fast():
    r = _drive("killed_during")
    assert r.get("error") is None, r
    assert r["posted"] == "PROC" and r["after_stop"] == "PROC", r
    assert r["after_kill"] == "nixlRemoteDisconnectError", r
    assert r["after_kill_s"] < 2.0, r


@pytest.mark.integration
def test_real_stopped_peer_leaves_transfer_proc_until_deadline():
    r = _drive("stopped")
    assert r.get("error") is None, r
    assert r["posted"] == "PROC", r
    assert r["after_stop"] == "PROC" and r["after_stop_s"] >= 0.5, r
    assert r["released"] is None, r
