"""Tests of the MoRI-IO fake (tests/fakes/fake_mori.py): API shape, real byte copies, status knobs."""

from __future__ import annotations

import ctypes
import importlib
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import torch

try:
    from tests.fakes import fake_mori as fm
except ImportError:  # run without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fakes import fake_mori as fm

pytestmark = pytest.mark.unit

SC = fm.StatusCode


@pytest.fixture(autouse=True)
def _fresh_fake():
    fm.reset()
    fm.knobs.wait_hang_cap_s = 0.1
    yield
    fm.reset()


def _key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def make_pair(notif: bool = True, backend: bool = True):
    a = fm.IOEngine(_key("init"), fm.IOEngineConfig(host="127.0.0.1", port=0))
    b = fm.IOEngine(_key("tgt"), fm.IOEngineConfig(host="127.0.0.1", port=0))
    if backend:
        cfg = fm.RdmaBackendConfig(qp_per_transfer=1, enable_notification=notif)
        a.create_backend(fm.BackendType.RDMA, cfg)
        b.create_backend(fm.BackendType.RDMA, cfg)
    # Exchange descriptors as bytes, the way a side channel would.
    a.register_remote_engine(fm.EngineDesc.unpack(b.get_engine_desc().pack()))
    b.register_remote_engine(fm.EngineDesc.unpack(a.get_engine_desc().pack()))
    return a, b


def make_bufs(a, b, n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n,), dtype=torch.uint8, generator=g)
    y = torch.zeros(n, dtype=torch.uint8)
    mx = a.register_torch_tensor(x)
    my = fm.MemoryDesc.unpack(b.register_torch_tensor(y).pack())  # remote desc travels as bytes
    return x, y, mx, my


# ------------------------------------------------------------------------------------------- API shape


def test_enum_members_match_real_names_and_values():
    assert {m.name: m.value for m in fm.BackendType} == {
        "Unknown": 0,
        "XGMI": 1,
        "RDMA": 2,
        "TCP": 3,
        "FABRIC": 4,
    }
    assert {m.name: m.value for m in fm.MemoryLocationType} == {"Unknown": 0, "CPU": 1, "GPU": 2}
    assert {m.name: m.value for m in fm.StatusCode} == {
        "SUCCESS": 0, "INIT": 1, "IN_PROGRESS": 2, "ERR_INVALID_ARGS": 11, "ERR_NOT_FOUND": 12,
        "ERR_RDMA_OP": 13, "ERR_BAD_STATE": 14, "ERR_GPU_OP": 15,
    }
    assert {m.name for m in fm.PollCqMode} == {"POLLING", "EVENT"}
    assert int(SC.ERR_RDMA_OP) == 13
    assert SC.SUCCESS != 0  # pybind11 scoped enums never compare equal to plain ints
    assert fm.mori_cpp.TransferStatus is fm.TransferStatus


def test_rdma_backend_config_signature_and_defaults():
    c = fm.RdmaBackendConfig(2, -1, 1, fm.PollCqMode.POLLING, enable_notification=False)
    assert (c.qp_per_transfer, c.post_batch_size, c.num_worker_threads) == (2, -1, 1)
    assert c.enable_notification is False
    d = fm.RdmaBackendConfig()
    assert (d.qp_per_transfer, d.num_worker_threads, d.notif_per_qp, d.chunk_bytes) == (1, -1, 1024, 65536)
    assert d.poll_cq_mode is fm.PollCqMode.POLLING and d.enable_notification is True
    with pytest.raises(TypeError):
        fm.RdmaBackendConfig(1, -1, 1, 0)  # poll_cq_mode must be the enum


def test_engine_desc_pack_roundtrip_and_fields():
    a = fm.IOEngine(_key("e"), fm.IOEngineConfig(host="127.0.0.1", port=0))
    assert a.get_engine_desc().port == 0
    a.create_backend(fm.BackendType.RDMA)
    d = a.get_engine_desc()
    assert d.port > 0 and d.host == "127.0.0.1" and d.node_id and d.hostname
    assert d.pid == __import__("os").getpid()
    blob = d.pack()
    assert isinstance(blob, bytes)
    assert msgspec.msgpack.decode(blob) == [d.key, d.node_id, d.hostname, d.host, d.port, d.pid]
    u = fm.EngineDesc.unpack(blob)
    assert u == d and u is not d and u.key == a.get_engine_desc().key
    with pytest.raises(TypeError):
        hash(d)  # pybind11 classes that bind only __eq__ are unhashable
    with pytest.raises(TypeError):
        fm.EngineDesc()
    with pytest.raises(AttributeError):
        d.port = 1


def test_memory_desc_pack_roundtrip_and_fields():
    a = fm.IOEngine(_key("e"), fm.IOEngineConfig())
    a.create_backend(fm.BackendType.RDMA)
    t = torch.ones(10, dtype=torch.float32)
    m = a.register_torch_tensor(t)
    assert (m.engine_key, m.data, m.size, m.loc, m.device_id) == (
        a.get_engine_desc().key, t.data_ptr(), 40, fm.MemoryLocationType.CPU, -1)
    assert m.ipc_handle == bytes(64) and m.device_bus_id == ""
    u = fm.MemoryDesc.unpack(m.pack())
    assert u == m and len(msgspec.msgpack.decode(m.pack())) == 15
    with pytest.raises(TypeError):
        hash(m)
    with pytest.raises(AttributeError):
        m.size = 3
    blank = fm.MemoryDesc()
    assert (blank.id, blank.size, blank.device_id) == (0, 0, -1)
    m2 = a.register_torch_tensor(torch.ones(4))
    assert m2.id == m.id + 1


@pytest.mark.parametrize("cls", [fm.EngineDesc, fm.MemoryDesc])
@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", b"garbage", b"\x93\x01", msgspec.msgpack.encode({"key": "x"}),
     msgspec.msgpack.encode([1, 2, 3]), msgspec.msgpack.encode(["k", 1.5]), b"\xff" * 9],
)
def test_unpack_garbage_raises_runtime_error(cls, blob):
    with pytest.raises(RuntimeError):
        cls.unpack(blob)


@pytest.mark.parametrize("cls", [fm.EngineDesc, fm.MemoryDesc])
@pytest.mark.parametrize("blob", [bytearray(b"\x90"), "text", None, 5])
def test_unpack_non_bytes_raises_type_error(cls, blob):
    with pytest.raises(TypeError):
        cls.unpack(blob)


def test_unpack_short_array_fills_defaults_like_msgpack_c():
    # msgpack-c's MSGPACK_DEFINE accepts arrays shorter than the struct: callers must validate.
    d = fm.EngineDesc.unpack(b"\x90")
    assert (d.key, d.port, d.pid) == ("", 0, 0)
    m = fm.MemoryDesc.unpack(msgspec.msgpack.encode(["k", 3]))
    assert (m.engine_key, m.id, m.size, m.loc) == ("k", 3, 0, fm.MemoryLocationType.Unknown)


def test_uids_are_monotonic_per_engine():
    a, _ = make_pair()
    uids = [a.allocate_transfer_uid() for _ in range(5)]
    assert uids == sorted(uids) and len(set(uids)) == 5


def test_transfer_args_are_positional_only():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    with pytest.raises(TypeError):
        a.write(mx, 0, my, 0, size=4, transfer_uid=0)
    with pytest.raises(TypeError):
        a.write(mx, 0, my, 0, 4)  # missing uid


def test_installed_makes_mori_io_importable():
    assert "mori.io" not in sys.modules or sys.modules["mori.io"] is not fm
    with fm.installed():
        io = importlib.import_module("mori.io")
        cpp = importlib.import_module("mori.cpp")
        assert io is fm and cpp.TransferStatus is fm.TransferStatus
        from mori.io import IOEngine  # noqa: F401
    assert sys.modules.get("mori.io") is not fm


# ------------------------------------------------------------------------------------------- byte copies


def test_write_copies_bytes_exactly():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 10, my, 100, 50, a.allocate_transfer_uid())
    assert isinstance(st, fm.TransferStatus)
    assert st.Succeeded()
    expect = torch.zeros_like(y)
    expect[100:150] = x[10:60]
    assert torch.equal(y, expect)


def test_read_copies_bytes_exactly():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    y.copy_(torch.arange(256, dtype=torch.int64).to(torch.uint8))
    before = x.clone()
    st = a.read(mx, 0, my, 200, 56, a.allocate_transfer_uid())
    assert st.Succeeded()
    assert torch.equal(x[:56], y[200:256]) and torch.equal(x[56:], before[56:])


def test_engine_batch_takes_lists_of_lists_and_returns_one_status_per_desc_pair():
    a, b = make_pair()
    x1, y1, mx1, my1 = make_bufs(a, b, seed=1)
    x2, y2, mx2, my2 = make_bufs(a, b, seed=2)
    uids = [a.allocate_transfer_uid(), a.allocate_transfer_uid()]
    sts = a.batch_write([mx1, mx2], [[0, 64], [8]], [my1, my2], [[128, 0], [16]], [[32, 16], [8]], uids)
    assert isinstance(sts, list) and len(sts) == 2
    assert a.wait_all(sts, timeout_ms=1000) is SC.SUCCESS
    assert torch.equal(y1[128:160], x1[0:32]) and torch.equal(y1[0:16], x1[64:80])
    assert torch.equal(y2[16:24], x2[8:16]) and int(y2[:16].sum()) == 0
    # batch_read pulls back into fresh local buffers
    x1.zero_()
    sts = a.batch_read((mx1,), ((0,),), (my1,), ((128,),), ((32,),), (a.allocate_transfer_uid(),))
    assert sts[0].Succeeded() and torch.equal(x1[:32], y1[128:160])


def test_session_read_write_batch():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    sess = a.create_session(mx, my)
    assert isinstance(sess, fm.IOEngineSession) and sess.alive()
    st = sess.write(0, 0, 16, sess.allocate_transfer_uid())
    assert st.Succeeded() and torch.equal(y[:16], x[:16])
    st = sess.batch_write([32, 96], [64, 200], [8, 8], sess.allocate_transfer_uid())
    assert isinstance(st, fm.TransferStatus)  # one status for the whole session batch
    assert st.Succeeded() and torch.equal(y[64:72], x[32:40]) and torch.equal(y[200:208], x[96:104])
    y[240:256] = 7
    st = sess.read(240, 240, 16, sess.allocate_transfer_uid())
    assert st.Succeeded() and bool((x[240:256] == 7).all())
    y[0:4] = 9
    st = sess.batch_read([0], [0], [4], sess.allocate_transfer_uid())
    assert st.Succeeded() and bool((x[0:4] == 9).all())


def test_register_memory_raw_host_pointer():
    a, b = make_pair()
    src = (ctypes.c_ubyte * 64)(*range(64))
    dst = bytearray(64)
    dst_buf = (ctypes.c_char * 64).from_buffer(dst)
    ms = a.register_memory(ctypes.addressof(src), 64, -1, fm.MemoryLocationType.CPU)
    md = b.register_memory(ctypes.addressof(dst_buf), 64, -1, fm.MemoryLocationType.CPU)
    assert ms.loc is fm.MemoryLocationType.CPU and ms.size == 64
    assert a.write(ms, 0, md, 0, 64, 0).Succeeded()
    assert bytes(dst) == bytes(range(64))
    del dst_buf


def test_register_torch_tensor_requires_contiguous():
    a, _ = make_pair()
    with pytest.raises(RuntimeError, match="contiguous"):
        a.register_torch_tensor(torch.zeros(4, 4).t())


def test_numpy_ints_accepted_as_offsets():
    np = pytest.importorskip("numpy")
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    offs = np.array([0, 16], dtype=np.int64)
    sts = a.batch_write([mx], [list(offs)], [my], [list(offs)], [[np.int64(8), np.int64(8)]], [0])
    assert sts[0].Succeeded() and torch.equal(y[16:24], x[16:24])


# ------------------------------------------------------------------------------------------- errors


def test_out_of_range_fails_at_submit_with_invalid_args():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 250, my, 0, 10, 0)
    assert st.Failed() and st.Code() is SC.ERR_INVALID_ARGS and "out of range" in st.Message()
    sts = a.batch_read([mx], [[0, 32]], [my], [[0, 32]], [[32, 300]], [1])
    assert sts[0].Code() is SC.ERR_INVALID_ARGS
    sess = a.create_session(mx, my)
    assert sess.batch_read([0, 32], [0, 32], [32, 250], 2).Code() is SC.ERR_INVALID_ARGS
    assert sess.batch_write([0, 8], [0], [8, 8], 3).Code() is SC.ERR_INVALID_ARGS  # length mismatch
    assert int(y.sum()) == 0


def test_engine_batch_rejects_flat_lists_and_ragged_outer_lists():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    with pytest.raises(TypeError):
        a.batch_write([mx], [0, 8], [my], [0, 8], [8, 8], [0])  # forgot the per-desc nesting
    with pytest.raises(ValueError):
        a.batch_write([mx, mx], [[0]], [my], [[0]], [[8]], [0])


def test_empty_batches_succeed():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    sts = a.batch_write([mx], [[]], [my], [[]], [[]], [0])
    assert sts[0].Succeeded()
    assert a.batch_write([], [], [], [], [], []) == []
    assert a.create_session(mx, my).batch_write([], [], [], 1).Succeeded()


def test_no_backend_gives_bad_state_and_no_session():
    a, b = make_pair(backend=False)
    x, y, mx, my = make_bufs(a, b)
    sts = a.batch_read([mx], [[0]], [my], [[0]], [[16]], [0])
    assert sts[0].Failed() and sts[0].Code() is SC.ERR_BAD_STATE
    assert a.create_session(mx, my) is None


def test_register_remote_engine_before_create_backend_is_forgotten():
    a = fm.IOEngine(_key("a"), fm.IOEngineConfig())
    b = fm.IOEngine(_key("b"), fm.IOEngineConfig())
    b.create_backend(fm.BackendType.RDMA)
    a.register_remote_engine(b.get_engine_desc())  # no backend yet: nothing keeps it
    a.create_backend(fm.BackendType.RDMA)
    x, y, mx, my = make_bufs(a, b)
    assert a.write(mx, 0, my, 0, 8, 0).Code() is SC.ERR_BAD_STATE
    a.register_remote_engine(b.get_engine_desc())
    assert a.write(mx, 0, my, 0, 8, 1).Succeeded()


def test_memory_registered_before_backend_is_invisible_to_peers():
    a = fm.IOEngine(_key("a"), fm.IOEngineConfig())
    b = fm.IOEngine(_key("b"), fm.IOEngineConfig())
    y = torch.zeros(16, dtype=torch.uint8)
    my = b.register_torch_tensor(y)  # before b has a backend
    for e in (a, b):
        e.create_backend(fm.BackendType.RDMA)
    a.register_remote_engine(b.get_engine_desc())
    mx = a.register_torch_tensor(torch.ones(16, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="size mismatch"):
        a.write(mx, 0, my, 0, 8, 0)


def test_engine_batch_stops_at_first_pair_without_backend_leaving_init():
    a, b = make_pair()
    c = fm.IOEngine(_key("c"), fm.IOEngineConfig())
    c.create_backend(fm.BackendType.RDMA)  # never registered with a
    x, y, mx, my = make_bufs(a, b)
    mz = c.register_torch_tensor(torch.zeros(256, dtype=torch.uint8))
    sts = a.batch_write(
        [mx, mx, mx], [[0], [0], [0]], [my, mz, my], [[0], [0], [8]], [[4], [4], [4]], [0, 1, 2]
    )
    assert sts[0].Succeeded()
    assert sts[1].Code() is SC.ERR_BAD_STATE
    assert sts[2].Init()  # real mori returns at the first unroutable pair
    assert a.wait_all([sts[0], sts[2]], timeout_ms=100) is SC.INIT  # INIT counts as "not SUCCESS"


def test_local_memory_must_be_registered():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    a.deregister_memory(mx)
    assert a.write(mx, 0, my, 0, 8, 0).Code() is SC.ERR_NOT_FOUND
    a.deregister_memory(mx)  # unknown desc: silently ignored


def test_remote_memory_deregistered_after_session_fails_transfer():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    assert a.write(mx, 0, my, 0, 8, 0).Succeeded()  # session now cached
    b.deregister_memory(my)
    st = a.write(mx, 0, my, 8, 8, 1)
    assert st.Failed() and st.Code() is SC.ERR_RDMA_OP
    assert int(y[8:16].sum()) == 0


def test_create_backend_refuses_a_bound_port():
    a = fm.IOEngine(_key("a"), fm.IOEngineConfig("127.0.0.1", 45555))
    a.create_backend(fm.BackendType.RDMA)
    b = fm.IOEngine(_key("b"), fm.IOEngineConfig("127.0.0.1", 45555))
    with pytest.raises(RuntimeError):
        b.create_backend(fm.BackendType.RDMA)
    with pytest.raises(NotImplementedError):
        b.create_backend(fm.BackendType.TCP)


# ------------------------------------------------------------------------------------------- statuses


def test_transfer_status_basics():
    s = fm.TransferStatus()
    assert s.Init() and s.Code() is SC.INIT and not s.Failed() and s.Message() == ""
    s.SetCode(SC.IN_PROGRESS)
    assert s.InProgress()
    s.Update(SC.ERR_RDMA_OP, "boom")
    assert s.Failed() and s.Message() == "boom"
    s.Update(SC.SUCCESS, "")  # failure is final for Update ...
    assert s.Code() is SC.ERR_RDMA_OP
    s.SetCode(SC.SUCCESS)  # ... but not for SetCode
    assert s.Succeeded()
    with pytest.raises(TypeError):
        s.SetCode(0)


def test_completion_after_n_polls_and_data_lands_only_then():
    a, b = make_pair()
    a.fake_knobs = fm.FakeMoriKnobs(polls_to_complete=3)
    x, y, mx, my = make_bufs(a, b)
    uid = a.allocate_transfer_uid()
    st = a.write(mx, 0, my, 0, 32, uid)
    key_a = a.get_engine_desc().key
    assert st.InProgress()  # poll 1
    assert st.Message() == ""  # not a poll
    assert st.Code() is SC.IN_PROGRESS  # poll 2
    assert int(y.sum()) == 0 and b.pop_inbound_transfer_status(key_a, uid) is None
    assert st.Succeeded()  # poll 3 lands it
    assert torch.equal(y[:32], x[:32]) and b.pop_inbound_transfer_status(key_a, uid).Succeeded()


def test_polls_zero_completes_inside_the_call():
    a, b = make_pair()
    fm.knobs.polls_to_complete = 0
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, 0)
    assert torch.equal(y[:8], x[:8])  # before any poll
    assert st.Succeeded()


def test_waitfor_zero_is_one_poll_and_blocking_waits_land_poll_mode_transfers():
    a, b = make_pair()
    fm.knobs.polls_to_complete = 2
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, 0)
    assert st.WaitFor(0) is SC.IN_PROGRESS
    assert st.WaitFor(0) is SC.SUCCESS
    fm.knobs.polls_to_complete = 1000
    st2 = a.write(mx, 8, my, 8, 8, 1)
    st2.Wait()
    assert st2.Succeeded() and torch.equal(y[:16], x[:16])
    st3 = a.write(mx, 16, my, 16, 8, 2)
    assert a.wait_all([st3], timeout_ms=50) is SC.SUCCESS


def test_injected_failure_has_code_and_message_and_moves_nothing():
    a, b = make_pair()
    fm.knobs.fail_code = SC.ERR_RDMA_OP
    fm.knobs.fail_message = "remote access error"
    fm.knobs.polls_to_complete = 2
    x, y, mx, my = make_bufs(a, b)
    uid = a.allocate_transfer_uid()
    st = a.write(mx, 0, my, 0, 64, uid)
    assert st.InProgress()  # poll 1
    assert st.Code() is SC.ERR_RDMA_OP  # poll 2: it fails where it would have landed
    assert st.Failed() and not st.Succeeded() and st.Message() == "remote access error"
    assert int(y.sum()) == 0
    assert b.pop_inbound_transfer_status(a.get_engine_desc().key, uid) is None


def test_fail_at_submit():
    a, b = make_pair()
    fm.knobs.fail_code = SC.ERR_RDMA_OP
    fm.knobs.fail_at_submit = True
    fm.knobs.polls_to_complete = 5
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, 0)
    assert st.Failed() and st.Code() is SC.ERR_RDMA_OP


def test_earlier_layer_fails_while_newest_succeeds():
    a, b = make_pair()
    a.fake_knobs = fm.FakeMoriKnobs(fail_code=SC.ERR_RDMA_OP, fail_filter=fm.FakeMoriKnobs.nth(0))
    x, y, mx, my = make_bufs(a, b)
    sts = [a.write(mx, i * 8, my, i * 8, 8, a.allocate_transfer_uid()) for i in range(3)]
    assert sts[-1].Succeeded() and sts[1].Succeeded()
    assert sts[0].Failed()
    assert a.wait_all(sts, timeout_ms=100) is SC.ERR_RDMA_OP
    assert int(y[:8].sum()) == 0 and torch.equal(y[8:24], x[8:24])


def test_fail_filter_by_uid():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    u0, u1 = a.allocate_transfer_uid(), a.allocate_transfer_uid()
    fm.knobs.fail_code = SC.ERR_BAD_STATE
    fm.knobs.fail_filter = fm.FakeMoriKnobs.uids(u1)
    assert a.write(mx, 0, my, 0, 8, u0).Succeeded()
    assert a.write(mx, 8, my, 8, 8, u1).Code() is SC.ERR_BAD_STATE


def test_hang_respects_deadlines_and_flags_unbounded_waits():
    a, b = make_pair()
    fm.knobs.hang = True
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, 0)
    for _ in range(50):
        assert st.InProgress()
    t0 = time.monotonic()
    assert st.WaitFor(60) is SC.IN_PROGRESS
    assert time.monotonic() - t0 >= 0.05
    assert a.wait_all([st], timeout_ms=30) is SC.IN_PROGRESS
    assert a.wait_all([st], timeout_ms=0) is SC.IN_PROGRESS
    with pytest.raises(fm.FakeMoriHangError):
        st.Wait()
    with pytest.raises(fm.FakeMoriHangError):
        a.wait_all([st])
    assert int(y.sum()) == 0 and a.fake_inflight() == 1
    assert a.fake_flush() == 1  # a late completion, e.g. after the caller gave up
    assert st.Succeeded() and torch.equal(y[:8], x[:8])


def test_hang_filter_and_flush_with_failure():
    a, b = make_pair()
    fm.knobs.hang = fm.FakeMoriKnobs.nth(1)
    x, y, mx, my = make_bufs(a, b)
    s0 = a.write(mx, 0, my, 0, 8, 0)
    s1 = a.write(mx, 8, my, 8, 8, 1)
    assert s0.Succeeded() and s1.InProgress()
    a.fake_flush(fail_code=SC.ERR_RDMA_OP)
    assert s1.Code() is SC.ERR_RDMA_OP and int(y[8:16].sum()) == 0


def test_timer_completion_wakes_waiters_without_polls():
    a, b = make_pair()
    fm.knobs.complete_after_s = 0.08
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, 0)
    assert st.InProgress() and st.InProgress()  # polls do not advance timer-driven transfers
    t0 = time.monotonic()
    assert a.wait_all([st], timeout_ms=2000) is SC.SUCCESS
    assert 0.04 <= time.monotonic() - t0 < 1.5
    assert torch.equal(y[:8], x[:8])


def test_per_engine_knobs_override_global():
    a, b = make_pair()
    fm.knobs.fail_code = SC.ERR_RDMA_OP
    b.fake_knobs = fm.FakeMoriKnobs()
    x, y, mx, my = make_bufs(a, b)
    mx_b = b.register_torch_tensor(torch.ones(8, dtype=torch.uint8))
    my_a = a.register_torch_tensor(torch.zeros(8, dtype=torch.uint8))
    assert a.write(mx, 0, my, 0, 8, 0).Failed()  # global knobs
    assert b.write(mx_b, 0, my_a, 0, 8, 0).Succeeded()  # b's own knobs


def test_concurrent_pollers_land_a_transfer_once():
    a, b = make_pair()
    fm.knobs.polls_to_complete = 40
    x, y, mx, my = make_bufs(a, b)
    uid = a.allocate_transfer_uid()
    st = a.write(mx, 0, my, 0, 256, uid)

    def poll():
        for _ in range(20):
            st.Succeeded()

    ts = [threading.Thread(target=poll) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert st.Succeeded() and torch.equal(x, y)
    assert b.pop_inbound_transfer_status(a.get_engine_desc().key, uid).Succeeded()


def test_wait_all_on_bare_statuses():
    a, _ = make_pair()
    assert a.wait_all([]) is SC.SUCCESS
    ok, busy, bad = fm.TransferStatus(), fm.TransferStatus(), fm.TransferStatus()
    ok.SetCode(SC.SUCCESS)
    busy.SetCode(SC.IN_PROGRESS)
    bad.SetCode(SC.ERR_RDMA_OP)
    assert a.wait_all([ok, busy, bad], timeout_ms=0) is SC.ERR_RDMA_OP
    assert a.wait_all([ok, busy], timeout_ms=0) is SC.IN_PROGRESS
    assert a.wait_all([ok, None], timeout_ms=0) is SC.SUCCESS
    threading.Timer(0.03, lambda: busy.Update(SC.SUCCESS, "")).start()
    assert busy.WaitFor(timeout_ms=1000) is SC.SUCCESS


def test_emulated_old_version_has_no_wait_all_or_waitfor():
    a, _ = make_pair()
    assert hasattr(a, "wait_all") and hasattr(fm.TransferStatus(), "WaitFor")
    fm.knobs.emulate_version = (1, 1, 1)
    assert not hasattr(a, "wait_all") and not hasattr(fm.TransferStatus(), "WaitFor")


# ------------------------------------------------------------------------------------------- inbound


def test_inbound_status_after_write_and_read():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    key_a = a.get_engine_desc().key
    uw, ur = a.allocate_transfer_uid(), a.allocate_transfer_uid()
    assert b.pop_inbound_transfer_status(key_a, uw) is None
    assert a.write(mx, 0, my, 0, 8, uw).Succeeded()
    assert a.read(mx, 8, my, 0, 8, ur).Succeeded()  # the initiator notifies on reads too
    for uid in (uw, ur):
        st = b.pop_inbound_transfer_status(key_a, uid)
        assert isinstance(st, fm.TransferStatus) and st.Succeeded()
    assert b.pop_inbound_transfer_status(key_a, uw).Succeeded()  # "pop" does not erase
    assert b.pop_inbound_transfer_status("someone-else", uw) is None
    assert a.pop_inbound_transfer_status(b.get_engine_desc().key, uw) is None  # only the target sees it
    sts = a.batch_write([mx], [[0]], [my], [[0]], [[4]], [a.allocate_transfer_uid()])
    assert sts[0].Succeeded() and b.pop_inbound_transfer_status(key_a, 2).Succeeded()


def test_inbound_status_needs_notification_enabled():
    a, b = make_pair(notif=False)
    x, y, mx, my = make_bufs(a, b)
    assert a.write(mx, 0, my, 0, 8, 0).Succeeded() and torch.equal(y[:8], x[:8])
    assert b.pop_inbound_transfer_status(a.get_engine_desc().key, 0) is None


def test_reused_uid_never_pops_again():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    key_a = a.get_engine_desc().key
    assert a.write(mx, 0, my, 0, 8, 7).Succeeded()
    assert b.pop_inbound_transfer_status(key_a, 7) is not None
    assert a.write(mx, 0, my, 0, 8, 7).Succeeded()
    assert b.pop_inbound_transfer_status(key_a, 7) is None


# ------------------------------------------------------------------------------------------- peer gone


def test_peer_gone_before_first_contact_raises():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    fm.kill_engine(b.get_engine_desc().key)
    with pytest.raises(RuntimeError):
        a.write(mx, 0, my, 0, 8, 0)
    with pytest.raises(RuntimeError):
        a.create_session(mx, my)


def test_peer_gone_with_cached_session_fails_status():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    sess = a.create_session(mx, my)
    assert a.write(mx, 0, my, 0, 8, 0).Succeeded()
    b.fake_kill()
    st = a.write(mx, 8, my, 8, 8, 1)
    assert st.Failed() and st.Code() is SC.ERR_RDMA_OP and "gone" in st.Message()
    assert sess.write(16, 16, 8, 2).Code() is SC.ERR_RDMA_OP
    assert sess.alive()  # constant True in real mori: not a liveness probe
    assert int(y[8:].sum()) == 0


def test_peer_gone_while_in_flight():
    a, b = make_pair()
    fm.knobs.polls_to_complete = 3
    x, y, mx, my = make_bufs(a, b)
    st = a.write(mx, 0, my, 0, 8, 0)
    assert st.InProgress()
    fm.kill_engine(b)
    assert a.wait_all([st], timeout_ms=100) is SC.ERR_RDMA_OP
    assert int(y.sum()) == 0


def test_restarted_peer_with_same_key_stays_broken_use_a_new_key():
    # Real mori never drops the QPs/sessions it built for an engine key: a peer restarted under the
    # same key keeps failing, even after re-registering its new EngineDesc.
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    key_b = b.get_engine_desc().key
    assert a.write(mx, 0, my, 0, 8, 0).Succeeded()
    b.fake_kill()
    b2 = fm.IOEngine(key_b, fm.IOEngineConfig("127.0.0.1", 0))
    b2.create_backend(fm.BackendType.RDMA)
    b2.register_torch_tensor(torch.zeros(4))  # so that my2's id differs from my's (sessions cache by id)
    y2 = torch.zeros(512, dtype=torch.uint8)
    my2 = b2.register_torch_tensor(y2)
    assert fm.get_engine(key_b) is b2
    assert a.write(mx, 0, my, 0, 8, 1).Code() is SC.ERR_RDMA_OP  # stale cached session
    with pytest.raises(RuntimeError):
        a.write(mx, 0, my2, 0, 8, 2)  # old EngineDesc (old port): connection refused
    a.register_remote_engine(b2.get_engine_desc())
    assert a.write(mx, 0, my2, 0, 8, 3).Code() is SC.ERR_RDMA_OP  # stale QPs to the old incarnation
    b3 = fm.IOEngine(_key("tgt"), fm.IOEngineConfig("127.0.0.1", 0))  # a fresh key works
    b3.create_backend(fm.BackendType.RDMA)
    a.register_remote_engine(b3.get_engine_desc())
    y3 = torch.zeros(8, dtype=torch.uint8)
    assert a.write(mx, 0, b3.register_torch_tensor(y3), 0, 8, 4).Succeeded() and torch.equal(y3, x[:8])


def test_deregister_remote_engine_blocks_engine_transfers_but_not_built_sessions():
    a, b = make_pair()
    x, y, mx, my = make_bufs(a, b)
    sess = a.create_session(mx, my)
    a.deregister_remote_engine(b.get_engine_desc())
    assert a.write(mx, 0, my, 0, 8, 0).Code() is SC.ERR_BAD_STATE
    assert a.create_session(mx, my) is None
    assert sess.write(0, 0, 8, 1).Succeeded() and torch.equal(y[:8], x[:8])
