"""Contract: the same cases against the MoRI-IO fake and, where installed, the real ``mori.io``.

The real library needs ROCm and an RDMA NIC: its cases are marked ``gpu`` and skip when ``mori`` is
not importable or no RDMA backend can be created. Memory is host memory (CPU tensors) on both sides,
so the cases run unchanged on either implementation. Knob-driven behaviour (poll counts, injected
failures, hangs) has no real counterpart and lives in tests/unit/test_fake_mori.py.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

try:
    from tests.fakes import fake_mori
except ImportError:  # run without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fakes import fake_mori

pytestmark = pytest.mark.integration

WAIT_S = 10.0


@dataclass
class Impl:
    kind: str  # "fake" | "real"
    io: ModuleType  # mori.io or the fake
    TransferStatus: type  # mori.cpp.TransferStatus (not re-exported by mori.io)
    engines: dict[str, Any] = field(default_factory=dict)

    def engine(self, name: str, notif: bool = True, backend: bool = True):
        io = self.io
        eng = io.IOEngine(f"{name}-{uuid.uuid4().hex[:8]}", io.IOEngineConfig(host="127.0.0.1", port=0))
        if backend:
            cfg = io.RdmaBackendConfig(qp_per_transfer=1, post_batch_size=-1, num_worker_threads=1,
                                       enable_notification=notif)
            try:
                eng.create_backend(io.BackendType.RDMA, cfg)
            except RuntimeError as e:  # real mori without an active RDMA device
                if self.kind == "real":
                    pytest.skip(f"mori.io cannot create an RDMA backend here: {e}")
                raise
        self.engines[name] = eng
        return eng

    def pair(self, notif: bool = True, backend: bool = True):
        a = self.engine("init", notif, backend)
        b = self.engine("tgt", notif, backend)
        a.register_remote_engine(self.io.EngineDesc.unpack(b.get_engine_desc().pack()))
        b.register_remote_engine(self.io.EngineDesc.unpack(a.get_engine_desc().pack()))
        return a, b

    def kill(self, name: str) -> None:
        eng = self.engines.pop(name)
        if self.kind == "fake":
            fake_mori.kill_engine(eng)
        del eng
        gc.collect()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.gpu)])
def impl(request, monkeypatch):
    if request.param == "fake":
        fake_mori.reset()
        fake_mori.knobs.wait_hang_cap_s = WAIT_S
        yield Impl("fake", fake_mori, fake_mori.TransferStatus)
        fake_mori.reset()
        return
    try:
        io = importlib.import_module("mori.io")
        cpp = importlib.import_module("mori.cpp")
    except Exception as e:  # ImportError, or a ROCm runtime that fails to load
        pytest.skip(f"real mori.io not importable: {e!r}")
    monkeypatch.setenv("MORI_DISABLE_AUTO_XGMI", "1")
    real = Impl("real", io, cpp.TransferStatus)
    yield real
    real.engines.clear()
    gc.collect()


def wait(status, timeout_s: float = WAIT_S):
    """Wait with a deadline; returns the final code (IN_PROGRESS if the deadline passed)."""
    deadline = time.monotonic() + timeout_s
    if hasattr(status, "WaitFor"):
        return status.WaitFor(int(timeout_s * 1000))
    while status.InProgress() and time.monotonic() < deadline:
        time.sleep(0.0005)
    return status.Code()


def wait_inbound(engine, remote_key: str, uid: int, timeout_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = engine.pop_inbound_transfer_status(remote_key, uid)
        if st is not None:
            return st
        time.sleep(0.001)
    return None


def bufs(a, b, n: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n,), dtype=torch.uint8, generator=g)
    y = torch.zeros(n, dtype=torch.uint8)
    mx = a.register_torch_tensor(x)
    my = type(mx).unpack(b.register_torch_tensor(y).pack())
    return x, y, mx, my


# ------------------------------------------------------------------------------------------- shape


def test_enums(impl):
    io = impl.io
    assert {m: int(getattr(io.StatusCode, m)) for m in (
        "SUCCESS", "INIT", "IN_PROGRESS", "ERR_INVALID_ARGS", "ERR_NOT_FOUND", "ERR_RDMA_OP",
        "ERR_BAD_STATE", "ERR_GPU_OP")} == {
        "SUCCESS": 0, "INIT": 1, "IN_PROGRESS": 2, "ERR_INVALID_ARGS": 11, "ERR_NOT_FOUND": 12,
        "ERR_RDMA_OP": 13, "ERR_BAD_STATE": 14, "ERR_GPU_OP": 15}
    assert [int(getattr(io.BackendType, m)) for m in ("Unknown", "XGMI", "RDMA", "TCP")] == [0, 1, 2, 3]
    assert [int(getattr(io.MemoryLocationType, m)) for m in ("Unknown", "CPU", "GPU")] == [0, 1, 2]
    assert [int(io.PollCqMode.POLLING), int(io.PollCqMode.EVENT)] == [0, 1]
    assert io.StatusCode.SUCCESS != 0


def test_engine_desc_roundtrip(impl):
    a = impl.engine("e")
    d = a.get_engine_desc()
    assert d.port > 0 and d.pid == os.getpid() and d.host == "127.0.0.1" and d.node_id
    u = impl.io.EngineDesc.unpack(d.pack())
    assert u == d and (u.key, u.port, u.pid, u.hostname) == (d.key, d.port, d.pid, d.hostname)
    with pytest.raises(TypeError):
        hash(d)


def test_memory_desc_roundtrip(impl):
    a = impl.engine("e")
    t = torch.arange(16, dtype=torch.int32)
    m = a.register_torch_tensor(t)
    assert (m.engine_key, m.data, m.size, m.loc, m.device_id) == (
        a.get_engine_desc().key, t.data_ptr(), 64, impl.io.MemoryLocationType.CPU, -1)
    u = impl.io.MemoryDesc.unpack(m.pack())
    assert u == m and u.id == m.id
    with pytest.raises(TypeError):
        hash(m)


@pytest.mark.parametrize("blob", [b"", b"\xc1", b"garbage", b"\x81\xa1k\x01", b"\x92\xa1k\xcb" + b"\0" * 8])
def test_unpack_garbage_raises(impl, blob):
    for cls in (impl.io.EngineDesc, impl.io.MemoryDesc):
        with pytest.raises(RuntimeError):
            cls.unpack(blob)
        with pytest.raises(TypeError):
            cls.unpack("not bytes")


def test_transfer_status_basics(impl):
    SC = impl.io.StatusCode
    s = impl.TransferStatus()
    assert s.Init() and s.Code() == SC.INIT and not s.Failed()
    s.SetCode(SC.IN_PROGRESS)
    assert s.InProgress()
    s.Update(SC.ERR_RDMA_OP, "x")
    s.Update(SC.SUCCESS, "")
    assert s.Failed() and s.Code() == SC.ERR_RDMA_OP and s.Message() == "x"


def test_uids_monotonic(impl):
    a = impl.engine("e")
    u = [a.allocate_transfer_uid() for _ in range(4)]
    assert u == sorted(u) and len(set(u)) == 4


# ------------------------------------------------------------------------------------------- data


def test_write_and_read_copy_bytes(impl):
    SC = impl.io.StatusCode
    a, b = impl.pair()
    x, y, mx, my = bufs(a, b)
    st = a.write(mx, 16, my, 128, 64, a.allocate_transfer_uid())
    assert wait(st) == SC.SUCCESS and st.Succeeded()
    assert torch.equal(y[128:192], x[16:80]) and int(y[:128].sum()) == 0 and int(y[192:].sum()) == 0
    y[400:432] = 5
    st = a.read(mx, 0, my, 400, 32, a.allocate_transfer_uid())
    assert wait(st) == SC.SUCCESS and bool((x[:32] == 5).all())


def test_engine_batch_shapes_and_bytes(impl):
    SC = impl.io.StatusCode
    a, b = impl.pair()
    x1, y1, mx1, my1 = bufs(a, b, seed=1)
    x2, y2, mx2, my2 = bufs(a, b, seed=2)
    uids = [a.allocate_transfer_uid(), a.allocate_transfer_uid()]
    sts = a.batch_write([mx1, mx2], [[0, 256], [64]], [my1, my2], [[256, 0], [32]], [[128, 64], [16]], uids)
    assert len(sts) == 2
    for st in sts:
        assert wait(st) == SC.SUCCESS
    assert torch.equal(y1[256:384], x1[0:128]) and torch.equal(y1[0:64], x1[256:320])
    assert torch.equal(y2[32:48], x2[64:80])
    x1.zero_()
    sts = a.batch_read([mx1], [[0]], [my1], [[256]], [[128]], [a.allocate_transfer_uid()])
    assert wait(sts[0]) == SC.SUCCESS and torch.equal(x1[:128], y1[256:384])
    sts = a.batch_write([mx1], [[]], [my1], [[]], [[]], [a.allocate_transfer_uid()])
    assert wait(sts[0]) == SC.SUCCESS


def test_session_ops(impl):
    SC = impl.io.StatusCode
    a, b = impl.pair()
    x, y, mx, my = bufs(a, b)
    sess = a.create_session(mx, my)
    assert sess is not None and sess.alive()
    st = sess.write(0, 0, 32, sess.allocate_transfer_uid())
    assert wait(st) == SC.SUCCESS and torch.equal(y[:32], x[:32])
    st = sess.batch_write([64, 192], [256, 300], [16, 16], sess.allocate_transfer_uid())
    assert wait(st) == SC.SUCCESS
    assert torch.equal(y[256:272], x[64:80]) and torch.equal(y[300:316], x[192:208])
    y[480:512] = 3
    st = sess.batch_read([480], [480], [32], sess.allocate_transfer_uid())
    assert wait(st) == SC.SUCCESS and bool((x[480:] == 3).all())
    st = sess.read(0, 480, 8, sess.allocate_transfer_uid())
    assert wait(st) == SC.SUCCESS and bool((x[:8] == 3).all())


# ------------------------------------------------------------------------------------------- errors


def test_out_of_range_and_mismatch_are_invalid_args(impl):
    SC = impl.io.StatusCode
    a, b = impl.pair()
    x, y, mx, my = bufs(a, b)
    assert wait(a.write(mx, 500, my, 0, 64, a.allocate_transfer_uid())) == SC.ERR_INVALID_ARGS
    sts = a.batch_read([mx], [[0, 64]], [my], [[0, 64]], [[64, 600]], [a.allocate_transfer_uid()])
    assert wait(sts[0]) == SC.ERR_INVALID_ARGS and sts[0].Failed()
    sess = a.create_session(mx, my)
    assert wait(sess.batch_write([0, 8], [0], [8, 8], sess.allocate_transfer_uid())) == SC.ERR_INVALID_ARGS


def test_no_backend_is_bad_state_and_no_session(impl):
    SC = impl.io.StatusCode
    a, b = impl.pair(backend=False)
    x, y, mx, my = bufs(a, b)
    sts = a.batch_read([mx], [[0]], [my], [[0]], [[16]], [a.allocate_transfer_uid()])
    assert sts[0].Failed() and sts[0].Code() == SC.ERR_BAD_STATE
    assert a.create_session(mx, my) is None


def test_unregistered_remote_is_bad_state(impl):
    SC = impl.io.StatusCode
    a = impl.engine("a")
    b = impl.engine("b")
    x, y, mx, my = bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, a.allocate_transfer_uid())
    assert st.Code() == SC.ERR_BAD_STATE


def test_peer_gone_before_first_contact_fails(impl):
    """A vanished peer either raises at submission (first contact) or fails the status by the deadline."""
    SC = impl.io.StatusCode
    a, b = impl.pair()
    x, y, mx, my = bufs(a, b)
    impl.kill("tgt")
    del b
    try:
        st = a.write(mx, 0, my, 0, 8, a.allocate_transfer_uid())
    except RuntimeError:
        return
    assert wait(st) not in (SC.SUCCESS, SC.IN_PROGRESS)


# ------------------------------------------------------------------------------------------- inbound & waits


def test_inbound_status_after_write(impl):
    a, b = impl.pair(notif=True)
    x, y, mx, my = bufs(a, b)
    uid = a.allocate_transfer_uid()
    st = a.write(mx, 0, my, 0, 64, uid)
    assert wait(st) == impl.io.StatusCode.SUCCESS
    inbound = wait_inbound(b, a.get_engine_desc().key, uid)
    assert inbound is not None and inbound.Succeeded()
    assert b.pop_inbound_transfer_status(a.get_engine_desc().key, uid + 1000) is None


def test_no_inbound_status_without_notification(impl):
    a, b = impl.pair(notif=False)
    x, y, mx, my = bufs(a, b)
    uid = a.allocate_transfer_uid()
    assert wait(a.write(mx, 0, my, 0, 64, uid)) == impl.io.StatusCode.SUCCESS
    assert torch.equal(y[:64], x[:64])
    time.sleep(0.05)
    assert b.pop_inbound_transfer_status(a.get_engine_desc().key, uid) is None


def test_wait_all_semantics(impl):
    SC = impl.io.StatusCode
    a = impl.engine("e")
    if not hasattr(a, "wait_all"):
        pytest.skip("this mori.io predates wait_all (added in v1.2.0)")
    assert a.wait_all([]) == SC.SUCCESS
    ok, busy, bad = impl.TransferStatus(), impl.TransferStatus(), impl.TransferStatus()
    ok.SetCode(SC.SUCCESS)
    busy.SetCode(SC.IN_PROGRESS)
    bad.SetCode(SC.ERR_RDMA_OP)
    assert a.wait_all([ok, busy, bad], timeout_ms=0) == SC.ERR_RDMA_OP
    assert a.wait_all([ok, busy], timeout_ms=0) == SC.IN_PROGRESS
    t0 = time.monotonic()
    assert a.wait_all([ok, busy], timeout_ms=30) == SC.IN_PROGRESS
    assert time.monotonic() - t0 >= 0.02
    assert busy.WaitFor(0) == SC.IN_PROGRESS
