"""P/D transfers end to end over the MoRI backend on the fake ``mori.io``: producer and consumer
engines (scheduler half, one worker per TP rank, aggregator) in one process, real KV tensors,
byte-for-byte checks, in read (pull) and write (push) mode."""

from __future__ import annotations

import random

import pytest

from tests.unit.pd_harness import assert_transferred, decode_start, prefill, run_until
from tests.unit.test_mori_harness import MoriEngine, mori_engines


@pytest.fixture
def engines():
    yield from mori_engines()


def _ids(engine: MoriEngine, prompt_len: int, seed: int, contiguous: bool = False) -> list[list[int]]:
    n = -(-prompt_len // engine.block_size)
    if contiguous:
        return [list(range(1 + seed % 3, 1 + seed % 3 + n)) for _ in range(engine.groups)]
    rnd = random.Random(seed)
    return [rnd.sample(range(1, engine.num_blocks), n) for _ in range(engine.groups)]


def _roundtrip(P: MoriEngine, D: MoriEngine, prompt_len: int = 45, seed: int = 0, contiguous: bool = False,
               p_rid: str = "p-req", d_rid: str = "d-req"):
    P.fill(seed)
    if P.kind == "mla":  # MLA KV is the same on every TP rank
        for caches in P.caches[1:]:
            for name, (t, _) in caches.items():
                t.copy_(P.caches[0][name][0])
    p_ids, d_ids = _ids(P, prompt_len, seed + 1, contiguous), _ids(D, prompt_len, seed + 2, contiguous)
    delay, params = prefill(P, p_rid, prompt_len, p_ids)
    assert delay is True
    assert decode_start(D, d_rid, prompt_len, params, d_ids) == (prompt_len, True)
    assert run_until([P, D], lambda: d_rid in D.recving and p_rid in P.sending), (D.recving, P.sending)
    assert d_rid not in D.failed
    assert_transferred(P, D, p_ids, d_ids, 0, prompt_len)
    return p_ids, d_ids


@pytest.mark.parametrize("mode", ["pull", "push", "read", "write"])
@pytest.mark.parametrize("kind", ["flash", "hnd", "cpu", "mla"])
def test_kv_arrives_byte_for_byte_for_each_layout(engines, mode, kind):
    P = engines("prefill", kind=kind, mode=mode)
    D = engines("decode", kind=kind, mode=mode)
    _roundtrip(P, D)
    assert P.stats.get("leases_done") == 1 and not P.stats.get("leases_expired")


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("p_tp,d_tp", [(1, 2), (2, 1), (4, 2), (2, 4)])
def test_heterogeneous_tp_moves_each_head_from_its_owner(engines, mode, p_tp, d_tp):
    P = engines("prefill", tp=p_tp, kind="hnd", mode=mode)
    D = engines("decode", tp=d_tp, kind="hnd", mode=mode)
    _roundtrip(P, D)


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (2, 4)])
def test_mla_with_heterogeneous_tp_and_every_producer_rank_frees(engines, mode, p_tp, d_tp):
    P = engines("prefill", tp=p_tp, kind="mla", mode=mode)
    D = engines("decode", tp=d_tp, kind="mla", mode=mode)
    _roundtrip(P, D)
    assert P.stats.get("leases_done") == p_tp


@pytest.mark.parametrize("mode", ["pull", "push"])
@pytest.mark.parametrize("p_bs,d_bs", [(16, 32), (32, 16)])
def test_block_size_mismatch_in_either_direction(engines, mode, p_bs, d_bs):
    P = engines("prefill", block_size=p_bs, mode=mode)
    D = engines("decode", block_size=d_bs, mode=mode)
    _roundtrip(P, D, prompt_len=70)


def test_hybrid_groups_transfer_per_group(engines):
    P = engines("prefill", groups=2)
    D = engines("decode", groups=2)
    _roundtrip(P, D)


def test_contiguous_blocks_move_as_few_large_rows(engines, monkeypatch):
    P = engines("prefill", kind="hnd")
    D = engines("decode", kind="hnd")
    eng = D.agent(0)
    rows: list[int] = []
    real = eng.batch_read

    def spy(lmds, loffs, rmds, roffs, sizes, uids):
        rows.append(sum(len(s) for s in sizes))
        return real(lmds, loffs, rmds, roffs, sizes, uids)

    monkeypatch.setattr(eng, "batch_read", spy)
    _roundtrip(P, D, prompt_len=64, contiguous=True)
    # 2 layers x K/V x 4 contiguous blocks: one row per layer and K/V plane, not per block/head
    assert rows == [4], rows
    assert D.stats["descriptors"] == 4 * rows[0]  # 16 descriptors (layer x K/V x block) posted as 4 rows


def test_many_requests_in_flight_complete_independently(engines):
    P = engines("prefill", tp=2, kind="hnd")
    D = engines("decode", tp=1, kind="hnd", num_blocks=64)
    P.fill(3)
    plan = []
    for i in range(6):
        p_ids, d_ids = [[1 + 3 * i, 2 + 3 * i, 3 + 3 * i]], [[40 - i, 50 - i, 60 - i]]
        _, params = prefill(P, f"p{i}", 40, p_ids)
        decode_start(D, f"d{i}", 40, params, d_ids)
        plan.append((p_ids, d_ids))
    assert run_until([P, D], lambda: len(D.recving) == 6 and len(P.sending) == 6)
    assert not D.failed
    for p_ids, d_ids in plan:
        assert_transferred(P, D, p_ids, d_ids, 0, 40)
