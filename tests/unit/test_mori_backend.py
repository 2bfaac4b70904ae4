"""The MoRI-IO transport on the fake ``mori.io``: injection and the missing-mori error, engine
configuration, handshake blobs, batching and run merging, and status semantics (every status
must succeed, polls never block, every transfer has a deadline)."""

from __future__ import annotations

import sys
import time

import msgspec
import numpy as np
import pytest
import torch

from kvconnect.api import EngineInfo
from kvconnect.backends.mori import (
    INSTALL_HINT,
    MoriBlob,
    MoriScheduler,
    MoriTransport,
    MoriWorker,
    load_mori,
)
from kvconnect.backends.mori.runs import batch_entries
from kvconnect.config import MoriConfig, parse_config
from kvconnect.errors import BackendUnavailableError, ConfigError, HandshakeError
from kvconnect.metadata import encode
from kvconnect.pd import PDScheduler, PDWorker
from kvconnect.pd.transport import Op, Status
from kvconnect.registry import create_worker, scheduler_class, worker_class
from tests.fakes import fake_mori as fm

SC = fm.StatusCode
NBYTES = 4096


@pytest.fixture(autouse=True)
def _fresh():
    fm.reset()
    fm.knobs.wait_hang_cap_s = 0.2
    yield
    fm.reset()


class Side:
    """One transport with two host regions of ``NBYTES`` (two separate tensors)."""

    def __init__(self, name: str, seed: int, **kw) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.bufs = [torch.randint(0, 255, (NBYTES,), dtype=torch.uint8, generator=gen) for _ in range(2)]
        self.regions = [(b.data_ptr(), NBYTES) for b in self.bufs]
        self.t = MoriTransport(name, fm, **kw)
        self.t.register(self.regions)

    def link(self, other: Side) -> str:
        return self.t.add_peer(other.t.metadata(), other.regions)


def _descs(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _pair(**kw):
    a, b = Side("a", 1, **kw), Side("b", 2, **kw)
    pb = a.link(b)
    b.link(a)
    return a, b, pb


def _wait(t: MoriTransport, h, timeout: float = 2.0) -> Status:
    end = time.monotonic() + timeout
    while (st := t.poll(h)) is Status.BUSY and time.monotonic() < end:
        time.sleep(0.001)
    return st


def _read_both_regions(a: Side, pb: str, rows: int = 4, size: int = 256):
    """A READ of ``rows`` blocks from each of b's two regions into a's: two region pairs."""
    d = _descs([(r, i * size, size) for r in (0, 1) for i in range(rows)])
    lp, rp = a.t.prepare(None, d), a.t.prepare(pb, d)
    idx = np.arange(len(d))
    return a.t.start(Op.READ, pb, lp, idx, rp, idx)


# -- wiring -----------------------------------------------------------------------------------------
def test_registry_resolves_the_pd_core_bound_to_mori():
    assert scheduler_class("mori") is MoriScheduler and worker_class("mori") is MoriWorker
    assert issubclass(MoriScheduler, PDScheduler) and issubclass(MoriWorker, PDWorker)


def test_missing_mori_fails_at_start_and_says_how_to_build_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mori", None)
    monkeypatch.setitem(sys.modules, "mori.io", None)
    with pytest.raises(BackendUnavailableError, match="github.com/ROCm/mori") as e:
        create_worker(parse_config({"backend": "mori"}), EngineInfo(engine_id="e"))
    assert "not on PyPI" in str(e.value) and INSTALL_HINT in str(e.value)


def test_importing_the_backend_does_not_import_mori():
    sys.modules.pop("mori.io", None)
    import kvconnect.backends.mori  # noqa: F401

    assert "mori.io" not in sys.modules


def test_installed_mori_is_found_by_name():
    with fm.installed():
        assert load_mori() is fm
        MoriWorker(MoriConfig(), EngineInfo(engine_id="e")).shutdown()


def test_engine_is_built_from_the_config_and_backend_created_before_any_registration(monkeypatch):
    calls: list[str] = []
    seen = {}
    real_engine, real_rdma = fm.IOEngine, fm.RdmaBackendConfig

    class Spy(real_engine):
        def create_backend(self, *a):
            calls.append("create_backend")
            return super().create_backend(*a)

        def register_memory(self, *a):
            calls.append("register_memory")
            return super().register_memory(*a)

        def register_remote_engine(self, *a):
            calls.append("register_remote_engine")
            return super().register_remote_engine(*a)

    class SpyRdma(real_rdma):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.setdefault("rdma", self)

    monkeypatch.setattr(fm, "IOEngine", Spy)
    monkeypatch.setattr(fm, "RdmaBackendConfig", SpyRdma)
    cfg = parse_config({"backend": "mori", "qp_per_transfer": 4, "post_batch_size": 8,
                        "num_worker_threads": 2, "poll_cq_mode": "event"}).backends[0]
    a = Side("a", 1, qp_per_transfer=cfg.qp_per_transfer, post_batch_size=cfg.post_batch_size,
             num_worker_threads=cfg.num_worker_threads, poll_cq_mode=cfg.poll_cq_mode)
    b = Side("b", 2)
    a.link(b)
    r = seen["rdma"]
    assert (r.qp_per_transfer, r.post_batch_size, r.num_worker_threads) == (4, 8, 2)
    assert r.poll_cq_mode is fm.PollCqMode.EVENT
    assert r.enable_notification is False
    assert (
        calls.index("create_backend") < calls.index("register_memory") < calls.index("register_remote_engine")
    )


def test_mori_config_rejects_bad_knobs():
    for bad in ({"qp_per_transfer": 0}, {"post_batch_size": 0}, {"mori_port": 70000},
                {"transfer_timeout_s": 0}, {"poll_cq_mode": "spin"}):
        with pytest.raises(ConfigError):
            parse_config({"backend": "mori", **bad})


def test_engine_keys_are_unique_per_process_start():
    a1, a2 = MoriTransport("same", fm), MoriTransport("same", fm)
    assert a1.agent_name != a2.agent_name and a1.agent_name.startswith("same-")
    assert fm.get_engine(a1.agent_name) is a1.engine  # the old incarnation is not replaced


# -- handshake blobs ----------------------------------------------------------------------------------
def test_metadata_carries_engine_and_memory_descriptors():
    a = Side("a", 1)
    blob = msgspec.msgpack.decode(a.t.metadata(), type=MoriBlob)
    assert fm.EngineDesc.unpack(blob.engine) == a.t.engine.get_engine_desc()
    mds = [fm.MemoryDesc.unpack(m) for m in blob.memory]
    assert [(md.data, md.size) for md in mds] == a.regions
    assert blob.mailbox_port > 0


def _blob_with(a: Side, **change) -> bytes:
    blob = msgspec.msgpack.decode(a.t.metadata(), type=MoriBlob)
    return encode(msgspec.structs.replace(blob, **change))


@pytest.mark.parametrize("case", ["garbage", "short_engine", "engine_not_msgpack", "short_memory",
                                  "memory_count", "memory_size", "memory_other_engine", "mailbox"])
def test_bad_peer_metadata_is_a_handshake_error_naming_the_field(case):
    a, b = Side("a", 1), Side("b", 2)
    other = Side("c", 3)
    md0 = msgspec.msgpack.decode(b.t.metadata(), type=MoriBlob).memory
    blob = {
        "garbage": b"\xc1not mori",
        "short_engine": _blob_with(b, engine=msgspec.msgpack.encode([])),  # unpacks with an empty key
        "engine_not_msgpack": _blob_with(b, engine=b"\xc1"),
        "short_memory": _blob_with(b, memory=[msgspec.msgpack.encode(["x"]), md0[1]]),
        "memory_count": _blob_with(b, memory=md0[:1]),
        "memory_size": _blob_with(b, memory=list(reversed(md0))) if b.regions[0] != b.regions[1] else None,
        "memory_other_engine": _blob_with(
            b, memory=msgspec.msgpack.decode(other.t.metadata(), type=MoriBlob).memory
        ),
        "mailbox": _blob_with(b, mailbox_port=0),
    }[case]
    with pytest.raises(HandshakeError, match="MoRI"):
        a.t.add_peer(blob, b.regions)


# -- batching --------------------------------------------------------------------------------------
def test_contiguous_rows_merge_into_one_row_per_run():
    # rows 0,1,2 contiguous on both sides; row 3 contiguous locally only; row 4 in another region
    e = batch_entries([0, 0, 0, 0, 1], [0, 10, 20, 30, 0], [0, 0, 0, 0, 1], [100, 110, 120, 200, 0],
                      [10, 10, 10, 10, 5])
    assert [(x.local, x.remote, x.local_offsets, x.remote_offsets, x.sizes) for x in e] == [
        (0, 0, [0, 30], [100, 200], [30, 10]), (1, 1, [0], [0], [5])]


def test_unordered_rows_still_merge_and_keep_their_pairing():
    e = batch_entries([0, 0, 0], [20, 0, 10], [0, 0, 0], [70, 50, 60], [10, 10, 10])
    assert (e[0].local_offsets, e[0].remote_offsets, e[0].sizes) == ([0], [50], [30])


def test_merging_can_be_turned_off_and_rows_never_exceed_the_request_limit():
    e = batch_entries([0, 0], [0, 10], [0, 0], [0, 10], [10, 10], merge=False)
    assert e[0].sizes == [10, 10]
    e = batch_entries([0, 0], [0, 10], [0, 0], [5, 15], [10, 10], max_bytes=8)
    assert e[0].sizes == [8, 8, 4] and e[0].local_offsets == [0, 8, 16] and e[0].remote_offsets == [5, 13, 21]


def test_a_transfer_posts_one_entry_and_one_uid_per_region_pair(monkeypatch):
    a, b, pb = _pair()
    seen = {}
    real = a.t.engine.batch_read

    def spy(*args):
        seen["args"] = args
        return real(*args)

    monkeypatch.setattr(a.t.engine, "batch_read", spy)
    h = _read_both_regions(a, pb, rows=4, size=256)
    lmds, loffs, rmds, roffs, sizes, uids = seen["args"]
    assert len(lmds) == len(rmds) == len(uids) == 2 and len(set(uids)) == 2
    assert sizes == [[1024], [1024]] and loffs == roffs == [[0], [0]]  # 4 contiguous rows -> 1 each
    assert _wait(a.t, h) is Status.DONE
    for r in (0, 1):
        assert torch.equal(a.bufs[r][:1024], b.bufs[r][:1024])
        assert not torch.equal(a.bufs[r][1024:], b.bufs[r][1024:])


def test_write_moves_bytes_and_delivers_the_notice_only_after_success():
    a, b, pb = _pair()
    d = _descs([(1, 512, 512)])
    h = a.t.start(Op.WRITE, pb, a.t.prepare(None, d), np.array([0]), a.t.prepare(pb, d), np.array([0]),
                  notify=b"written")
    assert b.t.notifications() == []
    assert _wait(a.t, h) is Status.DONE
    assert torch.equal(b.bufs[1][512:1024], a.bufs[1][512:1024])
    end = time.monotonic() + 2
    got = []
    while not got and time.monotonic() < end:
        got = b.t.notifications()
        time.sleep(0.001)
    assert got == [(a.t.agent_name, b"written")]


def test_failed_write_sends_no_notice():
    a, b, pb = _pair()
    fm.knobs.fail_code = SC.ERR_RDMA_OP
    d = _descs([(0, 0, 64)])
    h = a.t.start(Op.WRITE, pb, a.t.prepare(None, d), np.array([0]), a.t.prepare(pb, d), np.array([0]),
                  notify=b"written")
    assert _wait(a.t, h) is Status.FAILED
    time.sleep(0.05)
    assert b.t.notifications() == []


def test_notices_with_a_wrong_secret_are_dropped():
    a, b = Side("a", 1, secret="s1"), Side("b", 2, secret="s2")
    pb = a.link(b)
    a.t.notify(pb, b"hello")
    time.sleep(0.05)
    assert b.t.notifications() == []


def test_descriptors_outside_their_region_are_refused_at_prepare():
    a, b, pb = _pair()
    from kvconnect.errors import TransferError

    with pytest.raises(TransferError):
        a.t.prepare(pb, _descs([(0, NBYTES - 8, 16)]))
    with pytest.raises(TransferError):
        a.t.prepare(None, _descs([(2, 0, 16)]))


# -- statuses ------------------------------------------------------------------------------------
def test_request_with_a_failed_first_status_and_a_successful_last_is_failed():
    """Known fault of earlier integrations: only the last status was checked."""
    a, b, pb = _pair()
    a.t.engine.fake_knobs = fm.FakeMoriKnobs(fail_code=SC.ERR_RDMA_OP, fail_filter=fm.FakeMoriKnobs.nth(0))
    h = _read_both_regions(a, pb)
    assert len(h.statuses) == 2
    assert _wait(a.t, h) is Status.FAILED
    assert h.statuses[-1].Succeeded()  # the last one did succeed: the request is still failed


def test_request_with_a_failed_last_status_is_failed():
    a, b, pb = _pair()
    a.t.engine.fake_knobs = fm.FakeMoriKnobs(fail_code=SC.ERR_RDMA_OP, fail_filter=fm.FakeMoriKnobs.nth(1))
    assert _wait(a.t, _read_both_regions(a, pb)) is Status.FAILED


def _statuses(*codes):
    out = []
    for c in codes:
        s = fm.TransferStatus()
        s.SetCode(c)
        out.append(s)
    return out


@pytest.mark.parametrize("codes", [
    (SC.ERR_RDMA_OP, SC.SUCCESS),
    (SC.SUCCESS, SC.INIT),  # the batch returned at a pair with no backend: never posted
    (SC.SUCCESS,),  # fewer statuses than entries
])
def test_done_needs_every_status_succeeded(monkeypatch, codes):
    a, b, pb = _pair()
    monkeypatch.setattr(a.t.engine, "batch_read", lambda *args: _statuses(*codes))
    assert a.t.poll(_read_both_regions(a, pb)) is Status.FAILED


def test_failure_is_reported_once_in_flight_siblings_have_settled():
    a, b, pb = _pair()
    a.t.engine.fake_knobs = fm.FakeMoriKnobs(fail_code=SC.ERR_RDMA_OP, fail_filter=fm.FakeMoriKnobs.nth(0),
                                             fail_at_submit=True, polls_to_complete=3)
    h = _read_both_regions(a, pb)
    assert a.t.poll(h) is Status.BUSY  # sibling still in flight
    assert _wait(a.t, h) is Status.FAILED
    assert not h.pending


def test_poll_never_blocks_on_a_slow_transfer(monkeypatch):
    a, b, pb = _pair()

    def forbidden(*a, **k):
        raise AssertionError("a blocking wait was used")

    monkeypatch.setattr(fm.TransferStatus, "Wait", forbidden)
    monkeypatch.setattr(fm.IOEngine, "wait_all", property(forbidden))
    fm.knobs.polls_to_complete = 50
    h = _read_both_regions(a, pb)
    t0 = time.monotonic()
    polls = 0
    while a.t.poll(h) is Status.BUSY:
        polls += 1
    assert polls >= 20 and time.monotonic() - t0 < 0.5


def test_hung_status_fails_at_the_transfer_timeout():
    a, b, pb = _pair(transfer_timeout_s=0.3)
    fm.knobs.hang = True
    t0 = time.monotonic()
    h = _read_both_regions(a, pb)
    assert a.t.poll(h) is Status.BUSY
    assert _wait(a.t, h, 3.0) is Status.FAILED
    assert 0.3 <= time.monotonic() - t0 < 1.5


def test_first_contact_error_is_a_failed_transfer_not_an_exception():
    a, b, pb = _pair()
    fm.kill_engine(b.t.engine)
    h = _read_both_regions(a, pb)
    assert a.t.poll(h) is Status.FAILED


def test_transfers_work_on_mori_without_waitfor():
    fm.knobs.emulate_version = (1, 1, 1)
    a, b, pb = _pair()
    assert _wait(a.t, _read_both_regions(a, pb)) is Status.DONE
