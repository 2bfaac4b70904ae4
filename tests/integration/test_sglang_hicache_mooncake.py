"""kvconnect's SGLang HiCache storage on a real Mooncake Store (mooncake_master + a memory holder on
loopback): two instances in two processes share pages, a corrupt object is caught, and a killed
store makes lookups miss and sets / gets fail quickly, with the tier back after a restart.
Run under the heavy-job lock: it starts a master."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("sglang", reason="SGLang is not installed")
pytest.importorskip("mooncake.store", reason="pip install 'kvconnect[mooncake]'")

from tests.sglang_stubs import import_sglang  # noqa: E402

MODS = import_sglang()

from kvconnect.backends.mooncake.objects import HEADER_BYTES  # noqa: E402
from tests.sglang_stubs.host_pool import make_host_pool, page_bytes  # noqa: E402

HS = MODS["sglang.srt.mem_cache.hicache_storage"]
FACTORY = MODS["sglang.srt.mem_cache.storage.backend_factory"].StorageBackendFactory
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def store(tmp_path):
    from kvconnect.testing.mooncake import MooncakeStore

    st = MooncakeStore(tmp_path, segment_bytes=64 << 20).start()
    yield st
    st.stop()


def _extra(store, **kv) -> dict:
    kv.setdefault("retry_interval_s", 0.5)
    kv.setdefault("lookup_timeout_s", 1.0)
    kv.setdefault("load_timeout_s", 5.0)
    kv.setdefault("store_timeout_s", 5.0)
    return {"backend_name": "kvconnect", "module_path": "kvconnect.adapters.sglang.hicache",
            "class_name": "KVConnectHiCacheStorage", "interface_v1": 1,
            "kvconnect": {**store.config(), **kv}}


@pytest.fixture
def instance(store):
    made = []

    def make(seed: int = 0):
        pool = make_host_pool(seed=seed)
        sc = HS.HiCacheStorageConfig(
            tp_rank=0,
            tp_size=1,
            pp_rank=0,
            pp_size=1,
            attn_cp_rank=0,
            attn_cp_size=1,
            is_mla_model=False,
            enable_storage_metrics=False,
            is_page_first_layout=True,
            model_name="tiny",
            extra_config=_extra(store),
        )
        st = FACTORY.create_backend("dynamic", sc, pool)
        st.register_mem_pool_host(pool)
        made.append(st)
        return st, pool

    yield make
    for st in made:
        st.close()


def _idx(pool, pages) -> torch.Tensor:
    ps = pool.page_size
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages]).to(torch.int64)


def _keys(n: int, tag: str) -> list[str]:
    return [hashlib.sha256(f"{tag}/{i}".encode()).hexdigest() for i in range(n)]


def test_pages_one_instance_stores_are_loaded_byte_for_byte_by_another_process(instance, store):
    a, pa = instance()
    keys = _keys(6, "share")
    assert a.batch_set_v1(keys, _idx(pa, range(1, 7))) == [True] * 6
    req = {"extra": _extra(store), "keys": keys, "pages": list(range(9, 15))}
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.hicache_peer", json.dumps(req)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["exists"] == 6 and out["got"] == [True] * 6
    assert out["sha"] == [hashlib.sha256(page_bytes(pa, p)).hexdigest() for p in range(1, 7)]
    assert out["stats"]["get_pages"] == 6 and out["stats"]["objects_corrupt"] == 0


def test_a_corrupt_object_in_the_store_is_caught_and_removed(instance):
    a, pa = instance()
    keys = _keys(3, "corrupt")
    assert all(a.batch_set_v1(keys, _idx(pa, [0, 1, 2])))
    # Replace the middle object with one of the same size whose payload differs by one byte.
    name = a.object_key(keys[1])
    buf = np.zeros(a.page_bytes + HEADER_BYTES, np.uint8)
    a.store.register_buffer(buf.ctypes.data, buf.nbytes)
    try:
        assert a.store.batch_get_into_multi_buffers([name], [[buf.ctypes.data]], [[buf.nbytes]]) == [
            buf.nbytes
        ]
        buf[5] ^= 0x10
        assert a.store.batch_remove([name], True) == [0]
        assert a.store.batch_put_from_multi_buffers([name], [[buf.ctypes.data]], [[buf.nbytes]]) == [0]
    finally:
        a.store.unregister_buffer(buf.ctypes.data)
    assert a.batch_get_v1(keys, _idx(pa, [8, 9, 10])) == [True, False, False]
    assert page_bytes(pa, 8) == page_bytes(pa, 0)
    assert a.stats["objects_corrupt"] == 1 and a.batch_exists(keys) == 1  # removed


def test_a_killed_store_makes_lookups_miss_and_io_fail_quickly_and_the_tier_returns(instance, store):
    a, pa = instance()
    keys = _keys(4, "down")
    assert all(a.batch_set_v1(keys[:2], _idx(pa, [0, 1])))
    store.kill()
    timings = {}
    for what, call, want in [
        ("exists", lambda: a.batch_exists(keys[:2]), 0),
        ("set", lambda: a.batch_set_v1(keys[2:], _idx(pa, [2, 3])), [False, False]),
        ("get", lambda: a.batch_get_v1(keys[:2], _idx(pa, [8, 9])), [False, False]),
    ]:
        time.sleep(0.6)  # past the back-off a previous failure opened: each call reaches the store
        t0 = time.monotonic()
        assert call() == want, what
        timings[what] = time.monotonic() - t0
    # exists and the set's existence query: lookup_timeout_s; a get: Mooncake's own RPC failure (~4 s)
    assert timings["exists"] < 2.0 and timings["set"] < 2.0 and timings["get"] < 8.0, timings
    store.start()
    # Mooncake's client reconnects to the restarted master by itself (the old objects are gone).
    deadline = time.monotonic() + 30
    while not all(a.batch_set_v1(keys, _idx(pa, [0, 1, 2, 3]))) and time.monotonic() < deadline:
        time.sleep(0.6)
    assert a.batch_exists(keys) == 4
    assert a.batch_get_v1(keys, _idx(pa, [8, 9, 10, 11])) == [True] * 4
    assert [page_bytes(pa, p) for p in (8, 9, 10, 11)] == [page_bytes(pa, p) for p in (0, 1, 2, 3)]
