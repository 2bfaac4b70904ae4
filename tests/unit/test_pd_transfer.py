"""P/D transfers end to end on the fake NIXL agent: producer and consumer engines (scheduler half,
one worker per TP rank, aggregator) in one process, real KV tensors, byte-for-byte checks."""

from __future__ import annotations

import random

import pytest

from tests.unit.pd_harness import (
    Engine,
    assert_transferred,
    decode_start,
    prefill,
    run_until,
)


def _ids(engine: Engine, prompt_len: int, seed: int, contiguous: bool = False) -> list[list[int]]:
    n = -(-prompt_len // engine.block_size)
    if contiguous:
        start = 1 + seed % 3
        return [list(range(start, start + n)) for _ in range(engine.groups)]
    rnd = random.Random(seed)
    return [rnd.sample(range(1, engine.num_blocks), n) for _ in range(engine.groups)]


def _roundtrip(P: Engine, D: Engine, prompt_len: int = 45, seed: int = 0, contiguous: bool = False,
               p_rid: str = "p-req", d_rid: str = "d-req"):
    P.fill(seed)
    p_ids, d_ids = _ids(P, prompt_len, seed + 1, contiguous), _ids(D, prompt_len, seed + 2, contiguous)
    delay, params = prefill(P, p_rid, prompt_len, p_ids)
    assert delay is True
    n, is_async = decode_start(D, d_rid, prompt_len, params, d_ids)
    assert (n, is_async) == (prompt_len, True)
    assert run_until([P, D], lambda: d_rid in D.recving and p_rid in P.sending), (D.recving, P.sending)
    assert d_rid not in D.failed
    assert_transferred(P, D, p_ids, d_ids, 0, prompt_len)
    return p_ids, d_ids


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("kind", ["flash", "hnd", "cpu", "mla"])
def test_kv_arrives_byte_for_byte_for_each_layout(engines, mode, kind):
    P = engines("prefill", tp=1, kind=kind, mode=mode)
    D = engines("decode", tp=1, kind=kind, mode=mode)
    _roundtrip(P, D)


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 4), (2, 1), (4, 2)])
def test_heterogeneous_tp_moves_each_head_from_its_owner(engines, mode, p_tp, d_tp):
    P = engines("prefill", tp=p_tp, kind="hnd", mode=mode)
    D = engines("decode", tp=d_tp, kind="hnd", mode=mode)
    _roundtrip(P, D)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_replicated_gqa_heads_when_consumer_tp_exceeds_head_count(engines, mode):
    P = engines("prefill", tp=1, kind="cpu", num_heads=2, mode=mode)
    D = engines("decode", tp=4, kind="cpu", num_heads=2, mode=mode)
    _roundtrip(P, D)


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1)])
def test_mla_is_read_whole_from_one_rank_and_every_producer_rank_frees(engines, mode, p_tp, d_tp):
    P = engines("prefill", tp=p_tp, kind="mla", mode=mode)
    D = engines("decode", tp=d_tp, kind="mla", mode=mode)
    _roundtrip(P, D)


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("p_bs,d_bs", [(16, 32), (32, 16), (16, 24)])
def test_block_size_mismatch_in_either_direction(engines, mode, p_bs, d_bs):
    P = engines("prefill", tp=1, kind="flash", block_size=p_bs, mode=mode)
    D = engines("decode", tp=1, kind="flash", block_size=d_bs, mode=mode)
    _roundtrip(P, D, prompt_len=61)


def test_hetero_tp_and_block_size_mismatch_together(engines):
    P = engines("prefill", tp=2, kind="cpu", block_size=32)
    D = engines("decode", tp=4, kind="cpu", block_size=16)
    _roundtrip(P, D, prompt_len=70)


def test_kernel_blocks_smaller_than_engine_blocks(engines):
    P = engines("prefill", tp=1, kind="hnd", block_size=32, tensor_block_size=16)
    D = engines("decode", tp=1, kind="hnd", block_size=16)
    _roundtrip(P, D, prompt_len=50)


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_hybrid_groups_transfer_per_group_and_skip_null_blocks(engines, mode):
    P = engines("prefill", tp=1, kind="flash", groups=2, mode=mode)
    D = engines("decode", tp=1, kind="flash", groups=2, mode=mode)
    assert P.sched.supports_hybrid and P.workers[0].supports_hybrid
    P.fill(3)
    p_ids = [[1, 2, 3, 4], [0, 0, 5, 6]]  # group 1: a sliding window whose first blocks are null
    d_ids = [[7, 8, 9, 10], [0, 11, 12, 13]]
    before = D.caches[0]["layer1"][0][:, 11].clone()
    _, params = prefill(P, "p", 60, p_ids)
    assert params["remote_block_ids"] == p_ids
    decode_start(D, "d", 60, params, d_ids)
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert not D.failed
    assert_transferred(P, D, p_ids, d_ids, 0, 60, group=0)  # full attention: every token
    assert_transferred(P, D, p_ids, d_ids, 32, 60, group=1)  # sliding window: in-window blocks
    assert D.caches[0]["layer1"][0][:, 11].equal(before)  # its pair was null on the producer: untouched


def test_contiguous_runs_still_arrive_intact(engines):
    P = engines("prefill", tp=1, kind="flash")
    D = engines("decode", tp=1, kind="flash")
    _roundtrip(P, D, prompt_len=64, contiguous=True)


def test_only_tokens_not_cached_locally_are_loaded(engines):
    P = engines("prefill", tp=1, kind="hnd")
    D = engines("decode", tp=1, kind="hnd")
    P.fill(5)
    p_ids, d_ids = [[1, 2, 3, 4]], [[9, 10, 11, 12]]
    D.fill(6)
    cached = D.caches[0]["layer0"][0][:, 9].clone()
    _, params = prefill(P, "p", 60, p_ids)
    n, _ = decode_start(D, "d", 60, params, d_ids, computed=16)
    assert n == 44
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert_transferred(P, D, p_ids, d_ids, 16, 60)
    assert D.caches[0]["layer0"][0][:, 9].equal(cached)


def test_many_requests_in_flight_complete_independently(engines):
    P = engines("prefill", tp=2, kind="cpu", num_blocks=64)
    D = engines("decode", tp=2, kind="cpu", num_blocks=64)
    P.fill(7)
    rnd = random.Random(1)
    p_pool, d_pool = rnd.sample(range(1, 64), 60), rnd.sample(range(1, 64), 60)
    reqs = []
    for i in range(6):
        p_ids, d_ids = [p_pool[i * 3:(i + 1) * 3]], [d_pool[i * 3:(i + 1) * 3]]
        _, params = prefill(P, f"p{i}", 40, p_ids)
        decode_start(D, f"d{i}", 40, params, d_ids)
        reqs.append((p_ids, d_ids))
    assert run_until([P, D], lambda: len(D.recving) == 6 and len(P.sending) == 6)
    assert not D.failed
    for p_ids, d_ids in reqs:
        assert_transferred(P, D, p_ids, d_ids, 0, 40)
    assert D.stats["loads_done"] == 12 and D.stats["bytes_received"] > 0
