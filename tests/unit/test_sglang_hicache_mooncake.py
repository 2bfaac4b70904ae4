"""kvconnect's HiCache storage on the shared tier, built by SGLang's real storage factory, against
host-pool-like tensors whose page addressing is SGLang's own code, over FakeMooncakeDistributedStore
(every instance in this process shares the fake's objects, as every client of one master does)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("sglang", reason="SGLang is not installed")

from tests.sglang_stubs import import_sglang  # noqa: E402

MODS = import_sglang()

from kvconnect.adapters.sglang.hicache import KVConnectHiCacheStorage  # noqa: E402
from kvconnect.adapters.sglang.hicache_mooncake import MooncakeHiCacheStorage  # noqa: E402
from kvconnect.backends.mooncake.objects import HEADER_BYTES  # noqa: E402
from kvconnect.errors import ConfigError  # noqa: E402
from tests.fakes import fake_mooncake  # noqa: E402
from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore, cluster  # noqa: E402
from tests.sglang_stubs.host_pool import make_host_pool, make_mla_host_pool, page_bytes  # noqa: E402

HS = MODS["sglang.srt.mem_cache.hicache_storage"]
FACTORY = MODS["sglang.srt.mem_cache.storage.backend_factory"].StorageBackendFactory


def _extra(master, **kv) -> dict:
    kv.setdefault("connect_timeout_s", 2.0)
    kv.setdefault("retry_interval_s", 0.2)
    return {"backend_name": "kvconnect", "module_path": "kvconnect.adapters.sglang.hicache",
            "class_name": "KVConnectHiCacheStorage", "interface_v1": 1,
            "kvconnect": {"backend": "mooncake", "master_server_address": master.address, **kv}}


def _sc(extra: dict, *, model="tiny", tp_size=1, tp_rank=0, mla=False, metrics=False):
    return HS.HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=mla,
        enable_storage_metrics=metrics,
        is_page_first_layout=True,
        model_name=model,
        extra_config=extra,
    )


@pytest.fixture
def make(master):
    made = []

    def build(pool=None, *, sc_kw=None, **kv):
        pool = pool if pool is not None else make_host_pool()
        st = FACTORY.create_backend("dynamic", _sc(_extra(master, **kv), **(sc_kw or {})), pool,
                                    store_factory=FakeMooncakeDistributedStore)
        st.register_mem_pool_host(pool)  # what SGLang's cache controller does next
        made.append(st)
        return st, pool

    yield build
    for st in made:
        st.close()


def _idx(pool, pages) -> torch.Tensor:
    ps = pool.page_size
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages]).to(torch.int64)


def _keys(n: int, tag: str = "h") -> list[str]:
    return [f"{tag}{i:062x}" for i in range(n)]  # SGLang's page hashes are 64 hex digits


def test_sglang_factory_builds_the_mooncake_storage_and_registers_the_host_pool(make):
    st, pool = make()
    assert isinstance(st, MooncakeHiCacheStorage) and issubclass(KVConnectHiCacheStorage, HS.HiCacheStorage)
    assert isinstance(st, HS.HiCacheStorage)
    assert (
        st.store.buffers.get(pool.kv_buffer.data_ptr())
        == pool.kv_buffer.numel() * pool.kv_buffer.element_size()
    )


@pytest.mark.parametrize("kind", ["page_first", "layer_first", "mla"])
def test_pages_one_instance_sets_another_instance_gets_byte_for_byte(make, kind):
    mk = (lambda s: make_mla_host_pool(seed=s)) if kind == "mla" else (lambda s: make_host_pool(kind, seed=s))
    sc_kw = {"mla": kind == "mla"}
    a, pa = make(mk(0), sc_kw=sc_kw)
    b, pb = make(mk(1), sc_kw=sc_kw)
    keys = _keys(3)
    assert a.batch_set_v1(keys, _idx(pa, [1, 2, 5])) == [True, True, True]
    assert b.batch_exists(keys) == 3 and b.exists(keys[1])
    assert b.batch_get_v1(keys, _idx(pb, [10, 11, 12])) == [True, True, True]
    assert [page_bytes(pb, p) for p in (10, 11, 12)] == [page_bytes(pa, p) for p in (1, 2, 5)]
    assert b.stats["get_pages"] == 3 and a.stats["set_pages"] == 3
    assert b.stats["get_bytes"] == 3 * (a.page_bytes + HEADER_BYTES)


def test_a_set_spanning_several_put_batches_stores_every_page_verified(make):
    # batch_objects=2: 7 pages are 4 puts, each batch's checksums computed while the previous is put
    a, pa = make(batch_objects=2)
    b, pb = make(make_host_pool(seed=1), batch_objects=2)
    k = _keys(7)
    puts = cluster.calls["batch_put_from_multi_buffers"]  # the connection's probe put
    assert a.batch_set_v1(k, _idx(pa, range(7))) == [True] * 7
    assert cluster.calls["batch_put_from_multi_buffers"] == puts + 4
    assert b.batch_get_v1(k, _idx(pb, range(8, 15))) == [True] * 7
    assert [page_bytes(pb, p) for p in range(8, 15)] == [page_bytes(pa, p) for p in range(7)]


def test_objects_are_keyed_by_the_sglang_page_hash_under_the_rank_namespace(make):
    st, pool = make(sc_kw={"tp_size": 2, "tp_rank": 1})
    key = _keys(1)[0]
    st.batch_set_v1([key], _idx(pool, [0]))
    (stored,) = cluster.objects
    assert stored == st.object_key(key) and stored.startswith("kvc1/") and stored.endswith("/2.1/" + key)
    assert len(cluster.objects[stored]) == st.page_bytes + HEADER_BYTES


@pytest.mark.parametrize("differ", [
    {"sc_kw": {"model": "other-model"}},
    {"sc_kw": {"tp_size": 2, "tp_rank": 1}},
    {"pool": lambda: make_host_pool(page_size=8)},
    {"pool": lambda: make_host_pool(dtype=torch.bfloat16)},
    {"pool": lambda: make_host_pool(head_dim=4, head_num=4)},
    {"pool": lambda: make_host_pool("layer_first")},
    {"kv": {"hash_salt": "tenant-b"}},
], ids=["model", "tp_rank", "page_size", "dtype", "heads", "layout", "salt"])
def test_instances_whose_kv_bytes_differ_never_read_each_others_pages(make, differ):
    a, pa = make(sc_kw={"tp_size": 2, "tp_rank": 0} if "tp_size" in differ.get("sc_kw", {}) else None)
    keys = _keys(2)
    assert all(a.batch_set_v1(keys, _idx(pa, [0, 1])))
    b, pb = make(
        differ["pool"]() if "pool" in differ else None, sc_kw=differ.get("sc_kw"), **differ.get("kv", {})
    )
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, _idx(pb, [4, 5])) == [False, False]


def test_mla_pages_are_shared_across_tp_ranks(make):
    a, pa = make(make_mla_host_pool(seed=0), sc_kw={"mla": True, "tp_size": 2, "tp_rank": 0})
    b, pb = make(make_mla_host_pool(seed=1), sc_kw={"mla": True, "tp_size": 2, "tp_rank": 1})
    keys = _keys(2)
    assert all(a.batch_set_v1(keys, _idx(pa, [3, 4])))
    assert b.batch_get_v1(keys, _idx(pb, [8, 9])) == [True, True]
    assert page_bytes(pb, 8) == page_bytes(pa, 3) and page_bytes(pb, 9) == page_bytes(pa, 4)


def test_lookup_is_one_batched_existence_query_counting_the_leading_run(make):
    st, pool = make()
    k = _keys(4)
    st.batch_set_v1([k[0], k[2], k[3]], _idx(pool, [0, 2, 3]))
    before = cluster.calls.get("batch_is_exist", 0)
    assert st.batch_exists(k) == 1
    assert cluster.calls["batch_is_exist"] == before + 1
    assert st.stats["hit_pages"] == 1 and st.stats["lookup_pages"] == 4


def test_pages_already_stored_are_not_put_again(make):
    a, pa = make()
    b, pb = make(make_host_pool(seed=1))
    k = _keys(3)
    assert all(a.batch_set_v1(k[:2], _idx(pa, [0, 1])))
    puts = cluster.calls["batch_put_from_multi_buffers"]
    assert b.batch_set_v1([k[0], k[1], k[1], k[2]], _idx(pb, [5, 6, 6, 7])) == [True] * 4
    assert cluster.calls["batch_put_from_multi_buffers"] == puts + 1  # k[2] only
    assert b.stats["objects_present"] == 2 and b.stats["set_pages"] == 1
    out = b.batch_get_v1(k[:1], _idx(pb, [9]))
    assert out == [True] and page_bytes(pb, 9) == page_bytes(pa, 0)  # the first object was kept


@pytest.mark.parametrize("damage", ["payload", "header", "oversized"])
def test_a_corrupt_object_is_detected_removed_and_ends_the_load_there(make, damage):
    a, pa = make()
    b, pb = make(make_host_pool(seed=1))
    k = _keys(3)
    a.batch_set_v1(k, _idx(pa, [0, 1, 2]))
    name = a.object_key(k[1])
    obj = bytearray(cluster.objects[name])
    if damage == "oversized":
        obj += b"\0"
    else:
        obj[7 if damage == "payload" else len(obj) - 20] ^= 0x40
    cluster.objects[name] = bytes(obj)
    assert b.batch_get_v1(k, _idx(pb, [8, 9, 10])) == [True, False, False]
    assert page_bytes(pb, 8) == page_bytes(pa, 0)
    assert name not in cluster.objects  # removed, so a later set replaces it
    assert b.stats["objects_corrupt"] == 1 and b.stats["get_failures"] == 0
    assert b.batch_exists(k) == 1
    assert all(a.batch_set_v1(k, _idx(pa, [0, 1, 2])))
    assert b.batch_get_v1(k, _idx(pb, [8, 9, 10])) == [True] * 3


def test_a_missing_page_in_the_middle_ends_the_load_at_the_last_good_page(make):
    a, pa = make()
    b, pb = make(make_host_pool(seed=1))
    k = _keys(4)
    a.batch_set_v1(k, _idx(pa, [0, 1, 2, 3]))
    del cluster.objects[a.object_key(k[2])]
    assert b.batch_get_v1(k, _idx(pb, [8, 9, 10, 11])) == [True, True, False, False]
    assert b.stats["objects_missing"] == 1 and b.stats["objects_corrupt"] == 0


def test_a_store_that_is_down_makes_lookups_miss_sets_fail_and_gets_fail_at_once_then_recovers(make):
    a, pa = make()
    k = _keys(3)
    a.batch_set_v1(k[:2], _idx(pa, [0, 1]))
    cluster.down = True
    t0 = time.monotonic()
    assert a.batch_exists(k[:2]) == 0
    assert a.batch_set_v1(k[2:], _idx(pa, [2])) == [False]
    assert a.batch_get_v1(k[:2], _idx(pa, [8, 9])) == [False, False]
    assert time.monotonic() - t0 < 1.0
    s = a.stats
    assert s["sets_dropped"] == 1 and s["gets_skipped"] == 1 and s["lookups_skipped"] == 0
    assert a.batch_exists(k[:2]) == 0 and a.stats["lookups_skipped"] == 1  # backing off: no query
    cluster.down = False
    time.sleep(0.25)  # past retry_interval_s
    assert a.batch_exists(k[:2]) == 2
    assert a.batch_set_v1(k[2:], _idx(pa, [2])) == [True]
    assert a.batch_get_v1(k, _idx(pa, [8, 9, 10])) == [True] * 3


def test_a_stuck_existence_query_is_a_miss_within_lookup_timeout(make, monkeypatch):
    st, pool = make(lookup_timeout_s=0.3)
    release = threading.Event()
    real = st.store.batch_is_exist
    monkeypatch.setattr(st.store, "batch_is_exist", lambda keys: release.wait(10) and real(keys))
    t0 = time.monotonic()
    assert st.batch_exists(_keys(2)) == 0
    assert 0.25 < time.monotonic() - t0 < 1.5
    assert st.stats["lookup_timeouts"] == 1
    assert st.batch_exists(_keys(2)) == 0 and st.stats["lookups_skipped"] == 1
    release.set()


def test_a_set_whose_existence_query_is_stuck_returns_false_within_lookup_timeout(make, monkeypatch):
    st, pool = make(lookup_timeout_s=0.3)
    release = threading.Event()
    real = st.store.batch_is_exist
    monkeypatch.setattr(st.store, "batch_is_exist", lambda keys: release.wait(10) and real(keys))
    puts = cluster.calls.get("batch_put_from_multi_buffers", 0)
    t0 = time.monotonic()
    assert st.batch_set_v1(_keys(2), _idx(pool, [0, 1])) == [False, False]
    assert time.monotonic() - t0 < 1.5
    assert st.stats["sets_dropped"] == 2 and cluster.calls.get("batch_put_from_multi_buffers", 0) == puts
    release.set()


def test_a_get_past_its_deadline_waits_for_the_batch_in_flight_and_starts_no_other(make):
    # SGLang frees a failed get's pages once the call returns: no Mooncake write may land later.
    st, pool = make(batch_objects=2, load_timeout_s=0.3)
    k = _keys(6)
    assert all(st.batch_set_v1(k, _idx(pool, range(6))))
    gets = cluster.calls.get("batch_get_into_multi_buffers", 0)
    cluster.gate = threading.Event()
    threading.Timer(0.6, cluster.gate.set).start()
    t0 = time.monotonic()
    assert st.batch_get_v1(k, _idx(pool, range(8, 14))) == [True, True] + [False] * 4
    assert time.monotonic() - t0 >= 0.55
    assert cluster.calls["batch_get_into_multi_buffers"] == gets + 1
    assert st.stats["deadline_misses"] == 1


def test_puts_the_store_refuses_return_false_and_are_counted(make):
    st, pool = make()
    cluster.full = True
    assert st.batch_set_v1(_keys(2), _idx(pool, [0, 1])) == [False, False]
    assert st.stats["put_failures"] == 2 and st.health.usable()  # a full store is not a down store
    cluster.full, cluster.put_code = False, fake_mooncake.TRANSFER_FAIL
    assert st.batch_set_v1(_keys(2), _idx(pool, [0, 1])) == [False, False]
    assert not st.health.usable()


def test_nothing_raises_into_sglang(make, master):
    st, pool = make()
    bad = torch.arange(3, dtype=torch.int64)  # not whole pages
    assert st.batch_set_v1(_keys(2), bad) == [False, False]
    assert st.batch_get_v1(_keys(2), bad) == [False, False]
    assert st.stats["errors"] == 2
    early = FACTORY.create_backend(
        "dynamic", _sc(_extra(master)), pool, store_factory=FakeMooncakeDistributedStore
    )
    try:  # before SGLang hands over the host pool
        assert early.batch_exists(_keys(1)) == 0 and early.batch_set_v1(_keys(1), _idx(pool, [0])) == [False]
        assert early.batch_get_v1(_keys(1), _idx(pool, [0])) == [False]
    finally:
        early.close()
    st.close()
    assert st.batch_exists(_keys(1)) == 0 and st.batch_get_v1(_keys(1), _idx(pool, [0])) == [False]


@pytest.mark.parametrize("change, words", [
    (lambda e: e.pop("interface_v1"), "interface_v1"),
    (lambda e: e["kvconnect"].update(batch_objects=0), "batch_objects"),
    (lambda e: e["kvconnect"].update(master_server_address="127.0.0.1:1"), "master_server_address"),
    (lambda e: e["kvconnect"].update(master_server="x"), "master_server"),
])
def test_bad_config_is_a_config_error_naming_the_field(master, change, words):
    extra = _extra(master)
    change(extra)
    with pytest.raises(ConfigError, match=words):
        KVConnectHiCacheStorage(_sc(extra), {"store_factory": FakeMooncakeDistributedStore})


def test_clear_removes_this_ranks_pages_only(make):
    a, pa = make()
    other, po = make(sc_kw={"model": "other"})
    a.batch_set_v1(_keys(2), _idx(pa, [0, 1]))
    other.batch_set_v1(_keys(2), _idx(po, [0, 1]))
    a.clear()
    assert a.batch_exists(_keys(2)) == 0 and other.batch_exists(_keys(2)) == 2


def test_sglang_storage_metrics_report_pages_and_bandwidth_per_call(make):
    st, pool = make(sc_kw={"metrics": True})
    st.batch_set_v1(_keys(3), _idx(pool, [0, 1, 2]))
    st.batch_get_v1(_keys(3), _idx(pool, [5, 6, 7]))
    m = st.get_stats()
    assert m.backup_pgs == [3] and m.prefetch_pgs == [3]
    assert m.backup_bandwidth[0] > 0 and m.prefetch_bandwidth[0] > 0
    assert st.get_stats().backup_pgs == []


@pytest.mark.parametrize(
    "module, cls", [("hicache_mooncake", "MooncakeHiCacheStorage"), ("hicache_cpu", "CpuHiCacheStorage")]
)
def test_every_counter_a_storage_adds_is_declared(module, cls):
    # An undeclared name raises inside the storage, where it would be counted as an error.
    import ast
    import importlib

    mod = importlib.import_module(f"kvconnect.adapters.sglang.{module}")
    tree = ast.parse(open(mod.__file__).read())
    used = {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "add"
            and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "counters"
            for kw in node.keywords}
    assert used and used <= set(getattr(mod, cls).COUNTERS)
