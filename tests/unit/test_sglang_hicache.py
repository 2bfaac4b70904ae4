"""kvconnect's HiCache storage backend, built by SGLang's real storage factory and argument parser,
against a host-pool-like tensor whose page addressing is SGLang's own MHA host-pool code."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sglang", reason="SGLang is not installed")

from tests.sglang_stubs import import_sglang  # noqa: E402

MODS = import_sglang()

from kvconnect.adapters.sglang.hicache import KVConnectHiCacheStorage  # noqa: E402
from kvconnect.errors import ConfigError  # noqa: E402
from tests.sglang_stubs.host_pool import make_host_pool, make_mla_host_pool, page_bytes  # noqa: E402

HS = MODS["sglang.srt.mem_cache.hicache_storage"]
FACTORY = MODS["sglang.srt.mem_cache.storage.backend_factory"].StorageBackendFactory


def _extra(cpu_bytes: int, **kv) -> dict:
    return {
        "backend_name": "kvconnect",
        "module_path": "kvconnect.adapters.sglang.hicache",
        "class_name": "KVConnectHiCacheStorage",
        "interface_v1": 1,
        "kvconnect": {"backend": "cpu_offload", "cpu_bytes_to_use": cpu_bytes, **kv},
    }


def _storage_config(extra: dict, tp_size: int = 1):
    return HS.HiCacheStorageConfig(
        tp_rank=0, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="tiny", extra_config=extra,
    )


def _store(pool, slots: int, **kv) -> KVConnectHiCacheStorage:
    one_page = len(page_bytes(pool, 0))
    st = FACTORY.create_backend("dynamic", _storage_config(_extra(slots * one_page, **kv)), pool)
    st.register_mem_pool_host(pool)  # what SGLang's cache controller does next
    return st


def _idx(pool, pages) -> torch.Tensor:
    """Host-pool token indices of whole pages, as SGLang passes them."""
    ps = pool.page_size
    return torch.cat([torch.arange(p * ps, (p + 1) * ps) for p in pages]).to(torch.int64)


def test_real_argument_parser_accepts_the_dynamic_kvconnect_storage_backend():
    extra = json.dumps(_extra(10**9))
    args = MODS["sglang.srt.server_args"].prepare_server_args(
        [
            "--model-path",
            "/nonexistent",
            "--enable-hierarchical-cache",
            "--hicache-storage-backend",
            "dynamic",
            "--hicache-storage-backend-extra-config",
            extra,
        ]
    )
    assert args.hicache_storage_backend == "dynamic"
    assert json.loads(args.hicache_storage_backend_extra_config)["class_name"] == "KVConnectHiCacheStorage"


def test_sglang_factory_builds_kvconnect_storage_from_the_dynamic_config():
    pool = make_host_pool()
    st = _store(pool, slots=8)
    from kvconnect.adapters.sglang.hicache_cpu import CpuHiCacheStorage

    assert isinstance(st, CpuHiCacheStorage) and isinstance(st, HS.HiCacheStorage)
    assert st.num_slots == 8 and st.page_bytes == len(page_bytes(pool, 0))


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_v1_set_then_get_into_other_pages_copies_every_byte(layout):
    pool = make_host_pool(layout)
    st = _store(pool, slots=8)
    keys = ["h0", "h1", "h2"]
    want = [page_bytes(pool, p) for p in (1, 2, 5)]
    assert st.batch_set_v1(keys, _idx(pool, [1, 2, 5])) == [True, True, True]
    assert st.batch_exists(keys) == 3 and st.exists("h1") and not st.exists("nope")
    assert st.batch_get_v1(keys, _idx(pool, [10, 11, 12])) == [True, True, True]
    assert [page_bytes(pool, p) for p in (10, 11, 12)] == want


def test_get_stops_at_the_first_missing_key_and_leaves_later_pages_alone():
    pool = make_host_pool()
    st = _store(pool, slots=8)
    st.batch_set_v1(["a", "c"], _idx(pool, [0, 1]))
    before = page_bytes(pool, 9)
    assert st.batch_exists(["a", "b", "c"]) == 1
    assert st.batch_get_v1(["a", "b", "c"], _idx(pool, [8, 9, 10])) == [True, False, False]
    assert page_bytes(pool, 8) == page_bytes(pool, 0) and page_bytes(pool, 9) == before


def test_capacity_pressure_evicts_chain_tails_and_least_recent_pages_first():
    pool = make_host_pool()
    st = _store(pool, slots=4)
    # one prefix chain: its tail is the first to go, so what stays is still a usable prefix
    assert all(st.batch_set_v1(["p0", "p1", "p2", "p3"], _idx(pool, [0, 1, 2, 3])))
    assert all(st.batch_set_v1(["p4", "p5"], _idx(pool, [4, 5])))  # evicts p3, then p2
    assert st.batch_exists(["p0", "p1", "p2", "p3"]) == 2 and st.batch_exists(["p4", "p5"]) == 2
    assert st.batch_get_v1(["p0", "p1"], _idx(pool, [14, 15])) == [True, True]  # now the most recent
    assert all(st.batch_set_v1(["p6"], _idx(pool, [6])))  # evicts the least recent: p5 (tail of its chain)
    assert st.batch_exists(["p0", "p1"]) == 2 and st.batch_exists(["p4"]) == 1 and not st.exists("p5")
    assert st.batch_get_v1(["p4", "p6"], _idx(pool, [12, 13])) == [True, True]
    assert page_bytes(pool, 12) == page_bytes(pool, 4) and page_bytes(pool, 13) == page_bytes(pool, 6)


def test_pages_being_read_are_never_evicted_and_a_full_pinned_pool_rejects_stores():
    pool = make_host_pool()
    st = _store(pool, slots=2)
    st.batch_set_v1(["x", "y"], _idx(pool, [0, 1]))
    slots = st._index.ready_prefix([b"x", b"y"])
    st._index.pin(slots)  # as batch_get_v1 does while copying
    try:
        assert st.batch_set_v1(["z"], _idx(pool, [2])) == [False]
        assert st.stats["rejected"] == 1 and st.batch_exists(["x", "y"]) == 2
    finally:
        st._index.unpin(slots)
    assert st.batch_set_v1(["z"], _idx(pool, [2])) == [True]


def test_storing_a_known_key_again_is_a_no_op_success():
    pool = make_host_pool()
    st = _store(pool, slots=4)
    assert st.batch_set_v1(["k", "k"], _idx(pool, [0, 0])) == [True, True]
    assert st.batch_set_v1(["k"], _idx(pool, [3])) == [True]
    assert st.stats["set_pages"] == 1
    st.batch_get_v1(["k"], _idx(pool, [7]))
    assert page_bytes(pool, 7) == page_bytes(pool, 0)


def test_copying_interface_round_trips_flat_pages():
    pool = make_host_pool()
    st = _store(pool, slots=4)
    page = pool.get_data_page(2 * pool.page_size, flat=True).clone()
    assert st.batch_set(["f"], [page])
    target = pool.get_dummy_flat_data_page()
    got = st.batch_get(["f", "missing"], [target, pool.get_dummy_flat_data_page()])
    assert got[1] is None and torch.equal(got[0], page)


def test_capacity_is_split_over_tp_ranks_unless_per_rank():
    pool = make_host_pool()
    one = len(page_bytes(pool, 0))
    st = KVConnectHiCacheStorage(_storage_config(_extra(8 * one), tp_size=2))
    st.register_mem_pool_host(pool)
    assert st.num_slots == 4
    st = KVConnectHiCacheStorage(_storage_config(_extra(8 * one, per_rank=True), tp_size=2))
    st.register_mem_pool_host(pool)
    assert st.num_slots == 8


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"backend_name": "kvconnect"}, "'kvconnect' object"),
        ({"kvconnect": {"backend": "nixl"}}, "one 'cpu_offload' or 'mooncake' backend"),
        (
            {"kvconnect": {"backend": "cpu_offload", "cpu_bytes_to_use": 10, "eviction": "lru"}},
            "eviction_policy",
        ),
    ],
)
def test_bad_kvconnect_config_is_refused_naming_the_problem(extra, words):
    with pytest.raises(ConfigError, match=words):
        KVConnectHiCacheStorage(_storage_config(extra))


def test_a_store_smaller_than_one_page_is_refused_when_the_pool_arrives():
    st = KVConnectHiCacheStorage(_storage_config(_extra(16)))
    with pytest.raises(ConfigError, match="smaller than one"):
        st.register_mem_pool_host(make_host_pool())


@pytest.mark.parametrize("layout,stores,loads", [("page_first", 2, 1), ("layer_first", 6, 6)])
def test_mla_pages_copy_byte_for_byte_in_one_memmove_per_contiguous_run(layout, stores, loads, monkeypatch):
    # A page-first MLA page is one piece: pages 3, 4 (consecutive) go to slots 0, 1 (consecutive)
    # as one run, page 9 as a second; slots 0-2 come back into pages 12-14 as one. A layer-first
    # page is one piece per layer, none adjacent to the next: 3 pages x 2 layers both ways.
    from kvconnect.adapters.sglang import hicache_cpu as hicache

    pool = make_mla_host_pool(layout)
    st = _store(pool, slots=8)
    calls = []
    real = hicache.ctypes.memmove
    monkeypatch.setattr(hicache.ctypes, "memmove", lambda dst, src, n: calls.append(n) or real(dst, src, n))
    keys = ["m0", "m1", "m2"]
    want = [page_bytes(pool, p) for p in (3, 4, 9)]
    assert st.batch_set_v1(keys, _idx(pool, [3, 4, 9])) == [True, True, True]
    assert len(calls) == stores and sum(calls) == 3 * st.page_bytes
    calls.clear()
    assert st.batch_get_v1(keys, _idx(pool, [12, 13, 14])) == [True, True, True]
    assert len(calls) == loads and sum(calls) == 3 * st.page_bytes
    assert [page_bytes(pool, p) for p in (12, 13, 14)] == want
