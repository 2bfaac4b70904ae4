"""The SGLang transfer backend's data plane (kvconnect/adapters/sglang/link.py) on kvconnect's P/D
core, without SGLang: a prefill rank leases pages, a decode rank loads them with the core's push
protocol, over the fake NIXL agent and over the fake MoRI-IO (selected by the config, as
``KVCONNECT_SGLANG_CONFIG`` selects it), with checksums and deadlines. Plus the config rules."""

from __future__ import annotations

import json
import time

import msgspec
import numpy as np
import pytest

from kvconnect.adapters.sglang import wire as W
from kvconnect.adapters.sglang.link import RankLink, load_config, pool_layers, read_rows, write_rows
from kvconnect.backends.nixl import NixlWorker
from kvconnect.config import NixlConfig, PDConfig
from kvconnect.errors import ConfigError, KVConnectError, WireError
from kvconnect.handshake import SideChannelClient
from kvconnect.metadata import encode
from kvconnect.pd import wire as PW
from tests.fakes import fake_mori, fake_nixl

PAGES, ITEM, BUFFERS = 32, 64, 4
DEADLINE_S = 20.0
FAST = {
    "handshake_timeout_s": 2.0,
    "transfer_timeout_s": 3.0,
    "lease_timeout_s": 6.0,
    "poll_interval_s": 0.0005,
    "idle_poll_interval_s": 0.005,
}


def _nixl(cfg, engine):
    return NixlWorker(
        cfg, engine, agent_factory=fake_nixl.FakeNixlAgent, config_factory=fake_nixl.nixl_agent_config
    )


class Rank:
    """One SGLang rank's KV pool (``BUFFERS`` buffers of ``PAGES`` pages) and its link."""

    def __init__(self, name: str, cfg: PDConfig, seed: int | None, factory=None) -> None:
        rng = np.random.default_rng(seed)
        self.bufs = [
            rng.integers(0, 256, PAGES * ITEM, dtype=np.uint8)
            if seed is not None
            else np.zeros(PAGES * ITEM, np.uint8)
            for _ in range(BUFFERS)
        ]
        layers = pool_layers(
            [b.ctypes.data for b in self.bufs], [b.nbytes for b in self.bufs], [ITEM] * BUFFERS, "cpu"
        )
        self.link = RankLink(cfg, f"sgl-{name}", 0, layers, {"kv_item_lens": [ITEM] * BUFFERS}, factory)
        self.sent: dict[str, str | None] = {}
        self.recv: dict[str, str | None] = {}

    def page(self, buf: int, p: int) -> bytes:
        return self.bufs[buf][p * ITEM : (p + 1) * ITEM].tobytes()

    def ready(self, lease_id: str, src) -> W.Ready:
        return self.link.ready(1, lease_id, src, src, None, ())

    def drain(self) -> None:
        r = self.link.take()
        for rid in r.finished_sending:
            self.sent[rid] = r.failure_reasons.get(rid)
        for rid in r.finished_recving:
            self.recv[rid] = r.failure_reasons.get(rid, "failed") if rid in r.failed_recving else None


def _until(ranks, cond, timeout=DEADLINE_S) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for r in ranks:
            r.drain()
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError("condition not met before the deadline")


@pytest.fixture(params=["nixl", "mori"])
def pair(request):
    """A prefill and a decode rank over the backend the config names (fake engines)."""
    made: list[Rank] = []

    def make(**options):
        cfg = load_config(json.dumps({"backend": request.param, **FAST, **options}))
        factory = _nixl if request.param == "nixl" else None  # mori: the registry's MoriWorker
        P, D = Rank("prefill", cfg, seed=3, factory=factory), Rank("decode", cfg, seed=None, factory=factory)
        made.extend((P, D))
        return P, D

    make.backend = request.param  # type: ignore[attr-defined]
    fake_mori.reset()
    with fake_mori.installed():
        yield make
        for r in made:
            r.link.close()
    fake_mori.reset()


def _sums_served(P: Rank, lease_id: str) -> bool:
    body = encode(PW.ChecksumRequest(request_id=lease_id))
    client = SideChannelClient(None)
    try:
        client.request(P.link.host, P.link.port, "checksums", body, timeout_s=2.0)
        return True
    except KVConnectError:
        return False
    finally:
        client.close()


@pytest.mark.parametrize("verify", [False, True])
def test_leased_pages_are_written_into_the_decode_pages_byte_for_byte(pair, verify):
    P, D = pair(verify_checksums=verify)
    src, dst = [3, 4, 5, 20], [7, 8, 30, 0]
    P.link.lease("1@d", src)
    D.link.load("1", P.ready("1@d", src), src, dst)
    _until([P, D], lambda: "1" in D.recv and "1@d" in P.sent)
    assert D.recv["1"] is None and P.sent["1@d"] is None
    for b in range(BUFFERS):
        for s, d in zip(src, dst):
            assert D.page(b, d) == P.page(b, s)
        assert not any(D.page(b, p) != bytes(ITEM) for p in range(PAGES) if p not in dst)
    assert P.link.worker._transport.name == D.link.worker._transport.name == pair.backend


def test_a_page_corrupted_after_its_checksum_fails_the_load_naming_the_checksum(pair):
    P, D = pair(verify_checksums=True)
    src, dst = [3, 4, 5], [10, 11, 12]
    P.link.lease("2@d", src)
    _until([P], lambda: _sums_served(P, "2@d"))
    P.bufs[2][4 * ITEM + 9] ^= 0x40  # page 4 (decode page 11) changes after its checksum was taken
    D.link.load("2", P.ready("2@d", src), src, dst)
    _until([P, D], lambda: "2" in D.recv)
    assert "checksum mismatch in block(s) [11]" in D.recv["2"]


def test_a_lease_nobody_loads_ends_failed_at_lease_timeout(pair):
    P, _ = pair(lease_timeout_s=0.5, handshake_timeout_s=0.1, transfer_timeout_s=0.1)
    t0 = time.monotonic()
    P.link.lease("3@d", [1, 2])
    _until([P], lambda: "3@d" in P.sent, timeout=5)
    assert "lease expired" in P.sent["3@d"] and time.monotonic() - t0 < 3


def test_a_write_into_a_dead_decode_engine_fails_both_sides_with_a_reason(pair):
    P, D = pair(handshake_timeout_s=0.5, transfer_timeout_s=0.5, lease_timeout_s=2.0)
    t = D.link.worker._transport
    if pair.backend == "nixl":
        t.agent.kill()  # its side channel still answers; the transfer engine is gone
    else:
        fake_mori.kill_engine(t.engine)
    P.link.lease("5@d", [1, 2])
    D.link.load("5", P.ready("5@d", [1, 2]), [1, 2], [3, 4])
    _until([P, D], lambda: "5@d" in P.sent and "5" in D.recv)
    assert "write to consumer" in P.sent["5@d"] and D.recv["5"]


def test_a_load_from_a_prefill_that_never_answers_fails_at_its_deadline(pair):
    P, D = pair(handshake_timeout_s=0.3, transfer_timeout_s=0.3)
    ready = msgspec.structs.replace(P.ready("4@d", [1]), side_port=1)  # nobody listens there
    t0 = time.monotonic()
    D.link.load("4", ready, [1], [2])
    _until([D], lambda: "4" in D.recv, timeout=5)
    assert D.recv["4"] and time.monotonic() - t0 < 3


def test_metadata_rows_travel_between_slots_and_rows_that_do_not_fit_are_refused():
    src = [np.arange(32, dtype=np.uint8), np.arange(64, dtype=np.uint8)[::-1].copy()]  # 4 slots each
    dst = [np.zeros(32, np.uint8), np.zeros(64, np.uint8)]
    rows = read_rows([a.ctypes.data for a in src], [8, 16], 2)
    assert rows == (bytes(range(16, 24)), src[1][32:48].tobytes())
    ptrs, lens = [a.ctypes.data for a in dst], [a.nbytes for a in dst]
    write_rows(ptrs, lens, [8, 16], 1, rows)
    assert dst[0][8:16].tobytes() == rows[0] and dst[1][16:32].tobytes() == rows[1]
    for slot, bad in ((4, rows), (0, (rows[0], rows[1][:4])), (0, rows + (b"x",))):
        with pytest.raises(WireError):
            write_rows(ptrs, lens, [8, 16], slot, bad)
    assert not dst[0][:8].any() and not dst[1][:16].any()  # nothing written by a refused call


# -- config --------------------------------------------------------------------------------------------
def test_config_defaults_to_nixl_push_on_free_ports():
    cfg = load_config("")
    assert isinstance(cfg, NixlConfig) and cfg.mode == "push" and cfg.side_channel_port == 0


def test_every_pd_key_reaches_the_config_the_core_reads():
    keys = {
        "side_channel_host": "127.0.0.1",
        "side_channel_port": 7100,
        "advertise_host": "10.0.0.1",
        "secret": "s3",
        "handshake_timeout_s": 1.5,
        "transfer_timeout_s": 2.5,
        "lease_timeout_s": 9.0,
        "poll_interval_s": 0.001,
        "idle_poll_interval_s": 0.03,
        "verify_checksums": True,
        "merge_runs": False,
        "mode": "push",
    }
    for backend, extra in (
        ("nixl", {"nixl_backends": ["UCX"], "nixl_progress_thread": True}),
        ("mori", {"qp_per_transfer": 2, "mori_port": 7200, "poll_cq_mode": "event"}),
    ):
        cfg = load_config(json.dumps({"backend": backend, **keys, **extra}))
        for k, v in {**keys, **extra}.items():
            got = getattr(cfg, k)
            assert (list(got) if isinstance(got, tuple) else got) == v, k


@pytest.mark.parametrize("key", ["load_rule", "unsupported_model"])
def test_composition_keys_are_refused_naming_them(key):
    value = {"load_rule": "longest", "unsupported_model": "skip"}[key]
    for shape in ({"backend": "nixl", key: value}, {"backends": [{"backend": "nixl"}], key: value}):
        with pytest.raises(ConfigError, match=key):
            load_config(json.dumps(shape))


def test_a_one_backend_list_is_read_like_one_backend():
    with pytest.raises(ConfigError, match="mode 'pull'"):
        load_config(json.dumps({"backends": [{"backend": "mori", "mode": "pull"}]}))
    assert load_config(json.dumps({"backends": [{"backend": "mori"}]})).mode == "push"


@pytest.mark.parametrize("mode", ["pull", "read"])
def test_pull_mode_is_refused_naming_the_key(mode):
    with pytest.raises(ConfigError, match="mode 'pull'|mode 'read'") as e:
        load_config(json.dumps({"backend": "nixl", "mode": mode}))
    assert "push" in str(e.value)
