"""The mooncake backend on a real Mooncake Store (mooncake_master + a memory holder on loopback):
put, lookup, verified get, and what happens when the holder or the master dies and comes back.
Run under the heavy-job lock: it starts a master."""

from __future__ import annotations

import time

import pytest
import torch

from kvconnect.api import RequestView
from kvconnect.config import MooncakeConfig
from kvconnect.errors import ConfigError
from tests.unit.mooncake_harness import BS, make_instance

pytest.importorskip("mooncake.store", reason="pip install 'kvconnect[mooncake]'")

PROMPT = list(range(500, 500 + 6 * BS + 3))


@pytest.fixture
def store(tmp_path):
    from kvconnect.testing.mooncake import MooncakeStore

    st = MooncakeStore(tmp_path, segment_bytes=64 << 20).start()
    yield st
    st.stop()


def _cfg(store, **kw) -> MooncakeConfig:
    kw.setdefault("retry_interval_s", 0.5)
    kw.setdefault("load_timeout_s", 8.0)
    return MooncakeConfig(master_server_address=store.master_address,
                          metadata_server=store.metadata_server, **kw)


@pytest.fixture
def pair(store):
    made = []

    def make(**kw):
        a = make_instance(_cfg(store, **kw), engine_id="a", store_factory=None)
        b = make_instance(_cfg(store, **kw), engine_id="b", store_factory=None)
        made.extend([a, b])
        return a, b

    yield make
    for inst in made:
        inst.shutdown()


def _hit_and_load(b, rid, blocks):
    req = RequestView(rid, PROMPT)
    n, _ = b.lookup(req)
    b.sched.update_state_after_alloc(req, (blocks,), n)
    out = b.wait_for(lambda r: rid in r.finished_recving, timeout_s=15) if n else None
    return n, out


def test_stored_prefix_is_found_and_loaded_verified_from_the_real_store(pair):
    a, b = pair()
    out = a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    assert out.stats["objects_stored"] == 6
    n, res = _hit_and_load(b, "r2", list(range(10, 17)))
    assert n == 6 * BS and not res.invalid_block_ids
    for la, lb in zip(a.kv, b.kv):
        assert torch.equal(la[1:7], lb[10:16])


def test_a_dead_holder_fails_the_load_cleanly_and_quickly(pair, store):
    a, b = pair()
    a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
    req = RequestView("r2", PROMPT)
    n, _ = b.lookup(req)
    assert n == 6 * BS
    store.holder.stop(grace_s=0)
    blocks = list(range(10, 17))
    t0 = time.monotonic()
    b.sched.update_state_after_alloc(req, (blocks,), n)
    out = b.wait_for(lambda r: "r2" in r.finished_recving, timeout_s=15)
    assert time.monotonic() - t0 < 9.0
    assert out.invalid_block_ids == set(blocks[:6])


def test_a_dead_master_makes_lookups_miss_and_the_tier_returns_after_a_restart(pair, store):
    a, b = pair()
    store.kill()
    t0 = time.monotonic()
    assert a.lookup(RequestView("r1", PROMPT)) == (0, False)
    assert time.monotonic() - t0 < 3.0
    store.start()
    # Mooncake's client reconnects to the restarted master by itself (the old objects are gone).
    deadline = time.monotonic() + 30
    while True:
        time.sleep(0.6)  # past retry_interval_s
        a.serve_and_store(RequestView(f"s{time.monotonic()}", PROMPT), list(range(1, 8)))
        n, _ = b.lookup(RequestView(f"l{time.monotonic()}", PROMPT))
        if n == 6 * BS or time.monotonic() > deadline:
            break
    assert n == 6 * BS


def test_a_master_that_is_not_there_at_start_is_a_config_error(store):
    cfg = MooncakeConfig(master_server_address=f"127.0.0.1:{store.holder_port + 0}",
                         metadata_server=store.metadata_server, connect_timeout_s=3.0)
    store.stop()
    with pytest.raises(ConfigError, match="master_server_address"):
        make_instance(cfg, store_factory=None)


def test_a_client_in_another_metadata_mode_is_a_config_error(tmp_path):
    from kvconnect.testing.mooncake import mooncake_store

    with mooncake_store(tmp_path, segment_bytes=16 << 20, metadata="http") as st:
        cfg = MooncakeConfig(master_server_address=st.master_address, metadata_server="P2PHANDSHAKE",
                             connect_timeout_s=8.0)
        with pytest.raises(ConfigError, match="metadata_server"):
            make_instance(cfg, store_factory=None)


def test_bench_store_measures_kvconnect_next_to_raw_mooncake(capsys):
    import json

    from kvconnect.bench.store import main

    assert main(["--quick", "--json", "--lookup-stored", "200", "--lookup-prefix-blocks", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["put_gbps"] > 0 and r["raw_put_gbps"] > 0 and r["get_gbps"] > 0 and r["raw_get_gbps"] > 0
    assert r["lookup"][0]["stored_objects"] == 200 and r["lookup"][0]["lookup_us"] > 0


def _object_name(inst, req, index: int) -> str:
    return inst.worker.io.prefix + inst.sched._keys.keys(req, 6)[index].hex()


def _corrupt(inst, name: str) -> None:
    """Read the object back with the raw client, flip one payload byte, put it again."""
    import numpy as np

    store = inst.worker._shared.store
    buf = np.zeros(inst.worker.io.object_bytes, np.uint8)
    assert store.register_buffer(buf.ctypes.data, buf.nbytes) == 0
    try:
        assert store.batch_get_into([name], [buf.ctypes.data], [buf.nbytes]) == [buf.nbytes]
        buf[buf.nbytes // 3] ^= 0x04
        store.batch_remove([name], True)
        assert store.batch_put_from([name], [buf.ctypes.data], [buf.nbytes]) == [0]
    finally:
        store.unregister_buffer(buf.ctypes.data)


def test_staged_loads_verify_before_writing_and_stop_at_a_corrupt_or_missing_object(store):
    """staging='always' on the real store, buffers of 4 objects (7 blocks move in chunks of one):
    a zero-copy instance's objects load byte for byte; a corrupt object (block 3) and, after it
    was removed, a missing one end the load there and never reach the engine's blocks."""
    a = make_instance(_cfg(store), engine_id="a", store_factory=None)
    b = make_instance(_cfg(store, staging="always", staging_buffer_bytes=4 * a.worker.io.payload),
                      engine_id="b", store_factory=None)
    try:
        assert b.worker.io.staging is not None and b.worker.io.batch == 1
        a.serve_and_store(RequestView("r1", PROMPT), list(range(1, 8)))
        n, res = _hit_and_load(b, "r2", list(range(10, 17)))
        assert n == 6 * BS and not res.invalid_block_ids
        for la, lb in zip(a.kv, b.kv):
            assert torch.equal(la[1:7], lb[10:16])
        for what in ("corrupt", "missing"):
            a.serve_and_store(RequestView(f"r1-{what}", PROMPT), list(range(1, 8)))  # restores block 3
            req = RequestView(f"r3-{what}", PROMPT)
            assert b.lookup(req) == (6 * BS, True)
            name = _object_name(b, req, 3)
            if what == "corrupt":
                _corrupt(b, name)
            else:
                b.worker._shared.store.batch_remove([name], True)
            blocks = list(range(20, 27))
            for layer in b.kv:
                layer[20:27] = -7.0
            b.sched.update_state_after_alloc(req, (blocks,), 6 * BS)
            out = b.wait_for(lambda r, rid=req.request_id: rid in r.finished_recving, timeout_s=15)
            assert out.invalid_block_ids == set(blocks[3:6]), what
            for la, lb in zip(a.kv, b.kv):
                assert torch.equal(la[1:4], lb[20:23])
                assert bool((lb[23:26] == -7.0).all()), what
            if what == "corrupt":  # the bad object was removed: a later store can replace it
                assert b.worker._shared.store.batch_is_exist([name]) == [0]
    finally:
        b.shutdown()
        a.shutdown()
