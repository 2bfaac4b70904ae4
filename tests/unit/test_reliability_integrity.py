"""KV integrity (``verify_checksums``): the producer checksums what it leases, the consumer verifies
what arrived before reporting it, and a corrupted block is a failed load that the engine's
recompute policy repairs. Runs on the fake NIXL agent with real KV tensors."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvconnect import integrity
from kvconnect.layout import KVLayout
from tests.fakes import fake_nixl
from tests.unit.pd_harness import (
    Engine,
    _canon,
    assert_transferred,
    decode_start,
    make_layer,
    prefill,
    run_until,
    token_view,
)

pytestmark = pytest.mark.unit
CHECK = {"verify_checksums": True}


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(*args, **kw) -> Engine:
        kw.setdefault("options", {})
        kw["options"] = {**CHECK, **kw["options"]}
        e = Engine(*args, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()
    fake_nixl.registry.reset()


def _snapshot(P: Engine) -> SimpleNamespace:
    """A copy of the producer's KV: what a correct (re)computation of its requests yields."""
    return SimpleNamespace(
        tp=P.tp, num_heads=P.num_heads, block_size=P.block_size, kind=P.kind,
        caches=[{k: (t.clone(), lay) for k, (t, lay) in c.items()} for c in P.caches],
    )


def _sums_taken(P: Engine, rid: str) -> bool:
    return all(rid in w._loop.leases.served for w in P.workers)


def _recompute(ref, D: Engine, p_ids, d_ids, n: int) -> None:
    """The engine's recompute policy, for a TP-1 pair: the consumer's blocks get the KV a correct
    prefill computes (the producer's uncorrupted KV)."""
    for name, (ct, clay) in D.caches[0].items():
        pt, play = ref.caches[0][name]
        want = token_view(pt, play, ref.block_size, p_ids[0], 0, n)
        tok = torch.arange(0, n)
        eng = torch.tensor(d_ids[0])[tok // D.block_size]
        _canon(ct, clay)[eng, :, :, tok % clay.block_size, :] = want


# -- the checksum itself ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flash", "hnd", "cpu", "mla"])
def test_checksum_is_layout_independent_and_sees_one_changed_byte(kind):
    t, lay = make_layer(kind, 6, 16, 4)
    t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3)))
    base = integrity.token_head_sums([(t, lay)], [2, 4], 16, 0, 32)
    # the same KV in another memory order (HND vs NHD) and block size gives the same table
    if kind == "flash":
        t2, lay2 = make_layer("hnd", 12, 8, 4)
        c1, c2 = integrity.canonical(t, lay), integrity.canonical(t2, lay2)
        for i, b in enumerate([2, 4]):
            for half in range(2):
                c2[[5, 7, 9, 1][2 * i + half]] = c1[b, :, :, 8 * half: 8 * half + 8, :]
        assert np.array_equal(integrity.token_head_sums([(t2, lay2)], [5, 7, 9, 1], 8, 0, 32), base)
    t.view(torch.uint8).view(-1)[lay.stride_bytes("block") * 4 + 5] ^= 1  # block 4 = tokens 16..31
    after = integrity.token_head_sums([(t, lay)], [2, 4], 16, 0, 32)
    bad = np.flatnonzero((after != base).any(axis=1))
    assert len(bad) == 1 and 16 <= bad[0] < 32


def test_checksum_handles_rows_that_are_not_whole_words():
    t = torch.randint(0, 255, (4, 16, 3), dtype=torch.uint8)  # 3-byte rows
    lay = KVLayout.of_tensor(t, ("block", "token", "feature"))
    a = integrity.token_head_sums([(t, lay)], [1, 2], 16, 0, 32)
    t[2, 5, 1] ^= 0x10
    b = integrity.token_head_sums([(t, lay)], [1, 2], 16, 0, 32)
    assert list(np.flatnonzero((a != b).any(axis=1))) == [21]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checksum_on_the_gpu_equals_the_cpu_one():
    t, lay = make_layer("flash", 6, 16, 4)
    t.copy_(torch.randn(t.shape))
    cpu = integrity.token_head_sums([(t, lay)], [1, 3, 5], 16, 4, 40)
    gpu = integrity.token_head_sums([(t.cuda(), lay)], [1, 3, 5], 16, 4, 40)
    assert np.array_equal(cpu, gpu)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "p", "d"), [
    ("pull", {"kind": "flash"}, {"kind": "flash"}),
    ("push", {"kind": "hnd", "tp": 2}, {"kind": "hnd", "tp": 1, "block_size": 32}),
    ("pull", {"kind": "cpu", "tp": 1, "block_size": 32}, {"kind": "cpu", "tp": 2}),
    ("pull", {"kind": "mla", "tp": 2}, {"kind": "mla", "tp": 1}),
])
def test_verified_load_succeeds_and_moves_the_kv(engines, mode, p, d):
    P = engines("prefill", mode=mode, **p)
    D = engines("decode", mode=mode, **d)
    P.fill(5)
    n = 70
    p_ids = [[3, 9, 4, 10, 12][: -(-n // P.block_size)]]
    d_ids = [[7, 2, 15, 16, 5][: -(-n // D.block_size)]]
    _, params = prefill(P, "p", n, p_ids)
    decode_start(D, "d", n, params, d_ids)
    assert run_until([P, D], lambda: "d" in D.recving and "p" in P.sending)
    assert "d" not in D.failed
    assert_transferred(P, D, p_ids, d_ids, 0, n)
    assert D.stats.get("checksums_verified") == D.tp
    assert not D.stats.get("checksum_failures")


def test_hybrid_groups_are_verified_per_group_skipping_null_blocks(engines):
    P = engines("prefill", groups=2)
    D = engines("decode", groups=2)
    P.fill(2)
    p_ids, d_ids = [[1, 2, 3], [0, 5, 6]], [[7, 8, 9], [0, 0, 11]]
    _, params = prefill(P, "p", 40, p_ids)
    decode_start(D, "d", 40, params, d_ids)
    assert run_until([P, D], lambda: "d" in D.recving)
    assert "d" not in D.failed
    assert D.stats.get("checksums_verified") == 1


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_block_corrupted_on_the_producer_after_its_checksum_fails_the_load_and_recompute_repairs_it(
    engines, mode, caplog
):
    P = engines("prefill", mode=mode)
    D = engines("decode", mode=mode)
    P.fill(9)
    ref = _snapshot(P)
    reqs = {  # concurrent requests with distinct prompts and blocks
        "a": (40, [[1, 2, 3]], [[4, 5, 6]]),
        "b": (33, [[7, 8, 9]], [[10, 11, 12]]),
        "c": (20, [[13, 14]], [[15, 16]]),
    }
    params = {}
    for rid, (n, p_ids, _) in reqs.items():
        _, params[rid] = prefill(P, f"p{rid}", n, p_ids)
    assert run_until([P], lambda: all(_sums_taken(P, f"p{r}") for r in reqs))
    # corrupt one byte of block 8 (request b, tokens 16..31) in one layer, after its checksum
    t, lay = P.caches[0]["layer1"]
    t.view(torch.uint8).view(-1)[lay.stride_bytes("block") * 8 + 77] ^= 0x40
    with caplog.at_level(logging.WARNING):
        for rid, (n, _, d_ids) in reqs.items():
            decode_start(D, rid, n, params[rid], d_ids)
        assert run_until([P, D], lambda: set(reqs) <= D.recving and {f"p{r}" for r in reqs} <= P.sending)
    assert D.failed == {"b"}
    assert {10, 11, 12} <= D.invalid and not ({4, 5, 6, 15, 16} & D.invalid)
    assert D.stats.get("checksum_failures") == 1 and D.stats.get("checksums_verified") == 2
    assert "request b" in caplog.text and "block(s) [11]" in caplog.text
    for rid in ("a", "c"):
        n, p_ids, d_ids = reqs[rid]
        assert_transferred(ref, D, p_ids, d_ids, 0, n)
    n, p_ids, d_ids = reqs["b"]
    with pytest.raises(AssertionError):
        assert_transferred(ref, D, p_ids, d_ids, 0, n)
    _recompute(ref, D, p_ids, d_ids, n)  # the engine's kv_load_failure_policy=recompute
    assert_transferred(ref, D, p_ids, d_ids, 0, n)
    assert not D.sched.has_pending_work() and not P.sched.has_pending_work()


def test_corruption_on_the_consumer_side_of_a_partial_load_is_caught(engines):
    P = engines("prefill")
    D = engines("decode")
    P.fill(4)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    # the producer's checksum disagrees with the bytes it serves: a torn transfer looks the same
    assert run_until([P], lambda: _sums_taken(P, "p"))
    t, lay = P.caches[0]["layer0"]
    t.view(torch.uint8).view(-1)[lay.stride_bytes("block") * 3 + 1] ^= 0x01
    decode_start(D, "d", 40, params, [[4, 5, 6]], computed=16)  # tokens 16..39 only
    assert run_until([P, D], lambda: "d" in D.recving)
    assert "d" in D.failed and 6 in D.invalid


def test_missing_producer_checksums_fail_the_load_at_the_deadline(engines):
    P = engines("prefill", options={"verify_checksums": False})
    D = engines("decode", options={"handshake_timeout_s": 0.3, "transfer_timeout_s": 0.3})
    P.fill(1)
    _, params = prefill(P, "p", 40, [[1, 2, 3]])
    decode_start(D, "d", 40, params, [[4, 5, 6]])
    assert run_until([P, D], lambda: "d" in D.recving, 5.0)
    assert "d" in D.failed  # never hand the engine unverified KV
    assert run_until([P], lambda: "p" in P.sending, 5.0)


def test_served_checksums_outlive_their_lease_until_forgotten():
    from kvconnect.errors import WireError
    from kvconnect.pd.checksums import NOT_READY, ServedChecksums

    s = ServedChecksums()
    with pytest.raises(WireError, match=NOT_READY):
        s.get("r")
    s.put("r", b"old")
    assert "r" in s and len(s) == 1 and s.get("r") == b"old"
    old = s.retire("r")
    assert old == b"old" and "r" not in s and s.get("r") == b"old"  # a late push consumer still reads them
    s.put("r", b"new")  # the id leased again: the new lease's checksums win
    assert s.get("r") == b"new"
    s.retire("r")
    s.forget("r", old)  # the first lease's expiry must not drop the second's
    assert s.get("r") == b"new"
    s.forget("r", s.get("r"))
    with pytest.raises(WireError):
        s.get("r")
    assert s.retire("unknown") is None
