"""The Mooncake shared tier on hybrid models (a sliding-window and a full-attention KV-cache group),
byte for byte on FakeMooncakeDistributedStore. The engine side mirrors vLLM 0.32's hybrid
allocator: groups share KV tensors by layer position, block ids are unique over groups, block 0 is
the null block, and a sliding-window group's blocks before its window are null."""

from __future__ import annotations

import pytest
import torch

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView
from kvconnect.backends.mooncake import MooncakeScheduler, MooncakeWorker
from kvconnect.backends.mooncake.groups import GroupedBlocks
from kvconnect.backends.mooncake.objects import BlockObjects, LayerRuns
from kvconnect.errors import UnsupportedModelError
from kvconnect.layout import VLLM_CPU_DIMS, KVLayout
from tests.fakes import fake_mooncake
from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore
from tests.unit.mooncake_harness import BS, NUM_BLOCKS, Instance, config

pytestmark = pytest.mark.unit

WINDOW = 2 * BS  # a hit ending at block n needs sliding-window blocks n-2 and n-1
KINDS = ("sliding_window", "full_attention")
SW, FULL = 0, 1
NULL = 0
PROMPT = list(range(5000, 5000 + 6 * BS + 5))  # 6 full blocks and a partial one


def engine(engine_id: str = "e", kinds=KINDS) -> EngineInfo:
    return EngineInfo(engine_id, block_sizes=(BS,) * len(kinds), model_signature={"arch": "tiny-hybrid"},
                      model_name="m", group_kinds=kinds, sliding_windows=(WINDOW, 0)[: len(kinds)],
                      null_block_id=NULL)


class Hybrid(Instance):
    """An :class:`Instance` whose two groups share two layer tensors; block ids per group."""

    free: list[int]

    def alloc(self, n_blocks: int, first_real: int) -> list[list[int]]:
        """Full attention: every block real; sliding window: null before ``first_real``."""
        return [[NULL if g == SW and i < first_real else self.free.pop() for i in range(n_blocks)]
                for g in range(2)]

    def write(self, tokens: list[int], blocks: list[list[int]]) -> None:
        """The forward pass: block i of group g holds a function of the prefix and the group."""
        for g, ids in enumerate(blocks):
            for i, b in enumerate(ids):
                if b != NULL and (i + 1) * BS <= len(tokens):
                    for p, t in enumerate(self.kv):
                        t[b] = self.truth(tokens, i, g, p)

    def truth(self, tokens: list[int], i: int, g: int, p: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((tuple(tokens[: (i + 1) * BS]), g, p)) & 0xFFFFFFFF)
        return torch.randn(self.kv[0].shape[1:], generator=gen)

    def serve(self, r: RequestView) -> list[list[int]]:
        """A request with no hit, computed whole and finished (its window's blocks left in the
        sliding-window group, as vLLM leaves them); returns its block ids at finish."""
        n = len(r.prompt_token_ids)
        blocks = self.alloc(-(-n // BS), 0)
        self.sched.update_state_after_alloc(r, blocks, 0)
        self.step(StepView(scheduled=[ScheduledRequest(r.request_id, blocks, 0, n, True)]))
        self.write(list(r.prompt_token_ids), blocks)
        keep = max(0, n - WINDOW + 1) // BS
        at_finish = [
            [NULL if g == SW and i < keep else b for i, b in enumerate(ids)] for g, ids in enumerate(blocks)
        ]
        assert self.sched.request_finished(r, at_finish)[0]
        self.wait_for(lambda out: r.request_id in out.finished_sending)
        return at_finish


@pytest.fixture
def hybrids(master):
    made: list[Hybrid] = []

    def make(engine_id: str = "e", **cfg) -> Hybrid:
        cfg_ = config(master, **cfg)
        eng = engine(engine_id)
        kv = [torch.zeros(NUM_BLOCKS, 2, BS, 16) for _ in range(2)]
        w = MooncakeWorker(cfg_, eng, store_factory=FakeMooncakeDistributedStore)
        w.register_kv_caches({f"g{g}.l{p}": (t, KVLayout.of_tensor(t, VLLM_CPU_DIMS, group=g))
                              for g in range(2) for p, t in enumerate(kv)})
        s = MooncakeScheduler(cfg_, eng, store_factory=FakeMooncakeDistributedStore)
        s.set_handshake_metadata({0: w.get_handshake_metadata()})
        h = Hybrid(s, w, kv)
        h.free = list(range(NUM_BLOCKS - 1, 0, -1))
        made.append(h)
        return h

    yield make
    for h in made:
        h.shutdown()


def test_a_hybrid_prefix_stored_by_one_instance_loads_on_another_byte_for_byte(hybrids):
    a, b = hybrids("a"), hybrids("b")
    a.serve(RequestView("r1", PROMPT))
    r = RequestView("r2", PROMPT)
    assert b.lookup(r) == (6 * BS, True)
    blocks = b.alloc(7, first_real=4)  # vLLM nulls sliding-window blocks before the hit's window
    b.sched.update_state_after_alloc(r, blocks, 6 * BS)
    out = b.wait_for(lambda o: "r2" in o.finished_recving)
    assert not out.failed_recving and not out.invalid_block_ids
    for g, lo in ((FULL, 0), (SW, 4)):
        for i in range(lo, 6):
            for p in range(2):
                assert torch.equal(b.kv[p][blocks[g][i]], a.truth(PROMPT, i, g, p)), (g, i, p)


def test_only_the_sliding_windows_blocks_are_stored_never_null_blocks(hybrids):
    a = hybrids()
    a.serve(RequestView("r1", PROMPT))
    assert len(fake_mooncake.cluster.objects) == 6 + 2  # full attention 0..5, the window 4..5
    assert a.sched.get_stats()["save_blocks_planned"] == 8


def test_every_full_attention_block_present_is_no_hit_without_the_window(hybrids):
    a, b = hybrids("a"), hybrids("b")
    done = a.serve(RequestView("r1", PROMPT))
    head = a.kv[0][done[SW][5]].numpy().tobytes()[:16]
    del fake_mooncake.cluster.objects[
        next(k for k, v in fake_mooncake.cluster.objects.items() if v[:16] == head)
    ]
    # Full attention still has blocks 0..5, but no window n-2..n-1 is complete for any n.
    assert b.lookup(RequestView("r2", PROMPT)) == (0, False)


def test_a_longer_prompt_hits_where_the_stored_window_ends(hybrids):
    a, b = hybrids("a"), hybrids("b")
    a.serve(RequestView("r1", PROMPT))
    longer = PROMPT + list(range(9000, 9000 + 4 * BS))
    assert b.lookup(RequestView("r2", longer)) == (6 * BS, True)


def test_a_hybrid_load_that_ends_early_fails_the_whole_request(hybrids):
    a, b = hybrids("a"), hybrids("b")
    done = a.serve(RequestView("r1", PROMPT))
    r = RequestView("r2", PROMPT)
    assert b.lookup(r) == (6 * BS, True)
    head = a.kv[0][done[FULL][2]].numpy().tobytes()[:16]
    victim = next(k for k, v in fake_mooncake.cluster.objects.items() if v[:16] == head)
    data = bytearray(fake_mooncake.cluster.objects[victim])
    data[100] ^= 0xFF
    fake_mooncake.cluster.objects[victim] = bytes(data)
    blocks = b.alloc(7, first_real=4)
    b.sched.update_state_after_alloc(r, blocks, 6 * BS)
    out = b.wait_for(lambda o: "r2" in o.finished_recving)
    # vLLM maps block-level failures to requests only for one group: the request fails whole.
    assert "r2" in out.failed_recving
    assert victim not in fake_mooncake.cluster.objects
    # The engine recomputes it from the start; its finish stores every block again (nothing
    # counts as loaded): full attention 0..5 and the window 4..5.
    b.step(StepView(scheduled=[ScheduledRequest("r2", ((), ()), 0, len(PROMPT), False)]))
    assert b.sched.request_finished(r, blocks)[0]
    (save,) = b.sched.build_step_metadata(StepView()).saves
    assert sorted(zip(save.groups, save.block_ids)) == sorted(
        [(FULL, blocks[FULL][i]) for i in range(6)] + [(SW, blocks[SW][i]) for i in (4, 5)])


def test_the_engine_taking_fewer_tokens_loads_the_window_of_the_shorter_hit_or_fails_cleanly(hybrids):
    a, b = hybrids("a"), hybrids("b")
    a.serve(RequestView("r1", PROMPT))
    r = RequestView("r2", PROMPT)
    assert b.lookup(r) == (6 * BS, True)
    blocks = b.alloc(7, first_real=3)
    # A hit ending at block 5 needs sliding-window blocks 3 and 4; block 3 was never stored.
    b.sched.update_state_after_alloc(r, blocks, 5 * BS)
    out = b.wait_for(lambda o: "r2" in o.finished_recving)
    assert "r2" in out.failed_recving


def test_a_mamba_group_is_refused_on_both_halves(master):
    cfg = config(master)
    eng = engine(kinds=("mamba", "full_attention"))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        MooncakeScheduler(cfg, eng, store_factory=FakeMooncakeDistributedStore)
    with pytest.raises(UnsupportedModelError, match="mamba"):
        MooncakeWorker(cfg, eng, store_factory=FakeMooncakeDistributedStore)


def test_groups_whose_blocks_differ_in_size_are_refused():
    small = LayerRuns(0, 64, ((0, 64),), 8)
    big = LayerRuns(4096, 128, ((0, 128),), 8)
    with pytest.raises(UnsupportedModelError, match="same layers and block shape"):
        GroupedBlocks([BlockObjects([small]), BlockObjects([big])])


def test_grouped_blocks_number_each_groups_block_apart():
    a = LayerRuns(0, 64, ((0, 64),), 8)
    b = LayerRuns(10_000, 64, ((0, 64),), 8)
    gb = GroupedBlocks([BlockObjects([a]), BlockObjects([b])])
    assert gb.num_blocks == 16 and gb.payload_bytes == 64
    assert gb.runs(gb.number(3, 1)) == ([10_000 + 3 * 64], [64])
    assert gb.engine_block(gb.number(3, 1)) == 3


def test_a_composition_on_a_mamba_model_skips_the_shared_tier_or_fails_naming_it(master):
    from kvconnect.config import parse_config
    from kvconnect.registry import create_scheduler

    backends = [{"backend": "nixl"}, {"backend": "mooncake", "master_server_address": master.address}]
    eng = engine(kinds=("MambaSpec", "full_attention"))
    s = create_scheduler(parse_config({"backends": backends, "unsupported_model": "skip"}), eng)
    assert s.names == ["nixl"]
    s.shutdown()
    with pytest.raises(
        UnsupportedModelError, match=r"child 'mooncake' cannot serve.*group 0 uses 'MambaSpec'"
    ):
        create_scheduler(parse_config({"backends": backends}), eng)


def test_a_hybrid_hit_needs_each_groups_object_on_every_tp_rank(master):
    """The lookup alone (no workers): objects named as two ranks' workers would name them."""
    from kvconnect.backends.cpu_offload.hashing import KeyCache
    from kvconnect.backends.mooncake import keys as ks
    from kvconnect.backends.mooncake.messages import MooncakeHandshake

    cfg = config(master)
    eng = engine()
    eng.tp_size = 2
    s = MooncakeScheduler(cfg, eng, store_factory=FakeMooncakeDistributedStore)
    try:
        layouts = {r: bytes([r]) * 8 for r in range(2)}
        s.set_handshake_metadata(
            {r: MooncakeHandshake(tp_rank=r, layout=layouts[r], object_bytes=1) for r in range(2)}
        )
        prefixes = ks.prefixes_by_rank(ks.namespace(cfg, eng), layouts, 2)
        r = RequestView("r1", PROMPT)
        kc = KeyCache(ks.namespace(cfg, eng), BS)
        stored = [(FULL, i) for i in range(6)] + [(SW, 4), (SW, 5)]
        for p in prefixes:
            for g, i in stored:
                fake_mooncake.cluster.objects[p + kc.group_keys(r, 6, g)[i].hex()] = b"x"
        inst = Instance(s, None, [])  # lookups only
        assert inst.lookup(r) == (6 * BS, True)
        del fake_mooncake.cluster.objects[prefixes[1] + kc.group_keys(r, 6, SW)[5].hex()]
        assert inst.lookup(RequestView("r2", PROMPT)) == (0, False)
    finally:
        s.shutdown()
