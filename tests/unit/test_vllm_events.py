"""Tier events as vLLM KV cache events: the engine's own hashes, vLLM's types, its wire format."""

from __future__ import annotations

import copy

import pytest

from kvconnect.events import MEDIUM_CPU, BlocksRemoved, BlocksStored

pytestmark = pytest.mark.unit
BS = 16


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("vllm")
    from kvconnect.bench import vllm_env as B

    return B.make_env(BS, 256, 512)


def _request(env, rid: str, n_tokens: int):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, list(range(7, 7 + n_tokens)), SamplingParams(max_tokens=2), None,
                   block_hasher=env.hasher)


def test_stored_blocks_become_block_stored_with_the_engines_converted_hashes(env):
    import msgspec
    from vllm.distributed.kv_events import BlockStored, KVEventBatch
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    from kvconnect.adapters.vllm_events import to_vllm_events
    from kvconnect.adapters.vllm_translate import VllmRequestView

    req = _request(env, "r1", 4 * BS + 3)
    assert len(req.block_hashes) == 4
    view = VllmRequestView(req)
    toks = tuple(req.all_token_ids[BS : 3 * BS])
    ev = BlocksStored(MEDIUM_CPU, tuple(req.block_hashes[1:3]), req.block_hashes[0], toks, BS,
                      request=view, first_block=1)
    (out,) = to_vllm_events([ev])
    assert isinstance(out, BlockStored)
    assert out.block_hashes == [maybe_convert_block_hash(h) for h in req.block_hashes[1:3]]
    assert out.parent_block_hash == maybe_convert_block_hash(req.block_hashes[0])
    assert out.medium == "CPU" and out.block_size == BS and out.token_ids == list(toks)
    assert out.lora_id is None and out.lora_name is None and out.group_idx == 0
    # what a subscriber receives: vLLM's batch, msgpack-encoded, decoded with vLLM's types only
    wire = msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=[out]))
    got = msgspec.msgpack.Decoder(type=KVEventBatch).decode(wire)
    assert got.events == [out]


@pytest.mark.parametrize("as_int", ["1", "0"])
def test_hashes_are_converted_exactly_as_vllm_converts_its_device_hashes(env, monkeypatch, as_int):
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    from kvconnect.adapters.vllm_events import to_vllm_events

    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", as_int)
    req = _request(env, "r6", 3 * BS)
    (out,) = to_vllm_events([BlocksRemoved(MEDIUM_CPU, tuple(req.block_hashes))])
    assert out.block_hashes == [maybe_convert_block_hash(h) for h in req.block_hashes]
    assert isinstance(out.block_hashes[0], int if as_int == "1" else bytes)


def test_removed_blocks_become_block_removed_with_medium(env):
    from vllm.distributed.kv_events import BlockRemoved
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    from kvconnect.adapters.vllm_events import to_vllm_events

    req = _request(env, "r2", 2 * BS)
    (out,) = to_vllm_events([BlocksRemoved(MEDIUM_CPU, tuple(req.block_hashes))])
    assert out == BlockRemoved(block_hashes=[maybe_convert_block_hash(h) for h in req.block_hashes],
                               medium="CPU", group_idx=0)


def _connector(env, extra, events: bool):
    from vllm.config import KVEventsConfig

    from kvconnect.bench import vllm_env as B

    env2 = copy.copy(env)
    env2.vllm_config = copy.copy(env.vllm_config)
    env2.vllm_config.kv_events_config = KVEventsConfig(enable_kv_cache_events=events, publisher="null")
    return B.build_connector(env2, "KVConnect", "kv_both", extra)


def test_connector_publishes_its_cpu_tiers_events_only_when_vllm_publishes_events(env):
    from vllm.distributed.kv_events import BlockStored

    extra = {"backend": "cpu_offload", "cpu_bytes_to_use": 64 * env.bytes_per_block}
    off = _connector(env, extra, events=False)
    assert off._sched._events is None and list(off.take_events()) == []
    on = _connector(env, extra, events=True)
    req = _request(env, "r3", 2 * BS + 1)
    from kvconnect.adapters.vllm_translate import VllmRequestView

    tier = on._sched._events
    tier.planned(VllmRequestView(req), [0, 1], [b"k0", b"k1"])
    tier.ready([b"k0", b"k1"])
    (out,) = on.take_events()
    assert isinstance(out, BlockStored) and out.medium == "CPU" and len(out.block_hashes) == 2
    assert list(on.take_events()) == []


def test_a_composition_publishes_the_cpu_childs_events(env):
    extra = {"backends": [{"backend": "nixl", "side_channel_port": 5990},
                          {"backend": "cpu_offload", "cpu_bytes_to_use": 64 * env.bytes_per_block}]}
    conn = _connector(env, extra, events=True)
    cpu = conn._sched.children[1]
    tier = cpu._events
    from kvconnect.adapters.vllm_translate import VllmRequestView

    req = _request(env, "r4", 2 * BS)
    tier.planned(VllmRequestView(req), [0], [b"k0"])
    tier.ready([b"k0"])
    tier.dropped([b"k0"])
    kinds = [type(e).__name__ for e in conn.take_events()]
    assert kinds == ["BlockStored", "BlockRemoved"]


def test_hits_are_attributed_to_the_tier_that_served_them(env):
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    conn = _connector(
        env, {"backend": "cpu_offload", "cpu_bytes_to_use": 64 * env.bytes_per_block}, events=False
    )
    req = _request(env, "r5", 2 * BS)
    assert conn.get_external_cache_hit_sources(req, 32) == {CacheHitSource.HOST: 32}
    assert conn.get_external_cache_hit_sources(req, 0) == {}


def test_a_composition_names_the_source_of_the_child_that_owns_the_load():
    from kvconnect.api import EngineInfo, RequestView, SchedulerConnector
    from kvconnect.multi import MultiScheduler

    class Child(SchedulerConnector):
        def __init__(self, hit: int, source: str) -> None:
            self.hit, self.hit_source = hit, source

        def get_num_new_matched_tokens(self, request, num_computed_tokens):
            return self.hit, self.hit > 0

        def update_state_after_alloc(self, request, block_ids, num_external_tokens):
            return None

        def build_step_metadata(self, step):
            return None

    m = MultiScheduler([Child(0, "p2p"), Child(32, "host")], EngineInfo("e", block_sizes=(16,)),
                                     names=["nixl", "cpu_offload"])
    view = RequestView("r", list(range(40)))
    assert m.get_num_new_matched_tokens(view, 0) == (32, True)
    m.update_state_after_alloc(view, [[1, 2, 3]], 32)
    assert m.hit_source_of("r") == "host"
    assert m.hit_source_of("other") is None


def test_a_remote_storage_tiers_locality_and_ownership_reach_vllms_events(env):
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    from kvconnect.adapters.vllm_events import to_vllm_events
    from kvconnect.events import LOCALITY_REMOTE, MEDIUM_STORAGE

    req = _request(env, "r7", 2 * BS)
    toks = tuple(req.all_token_ids[: 2 * BS])
    stored, gone = to_vllm_events([
        BlocksStored(MEDIUM_STORAGE, tuple(req.block_hashes), None, toks, BS, locality=LOCALITY_REMOTE,
                     ownership="mooncake"),
        BlocksRemoved(MEDIUM_STORAGE, tuple(req.block_hashes[:1]), 0, LOCALITY_REMOTE, "mooncake"),
    ])
    assert isinstance(stored, BlockStored) and isinstance(gone, BlockRemoved)
    for e in (stored, gone):
        assert (e.medium, e.locality, e.ownership) == ("STORAGE", "REMOTE", "mooncake")
