"""CPU offload tier on hybrid models (sliding-window + full-attention KV-cache groups), byte for
byte: the engine side mirrors vLLM 0.32's hybrid allocator (groups share KV tensors by layer
position, block ids are unique over groups, block 0 is the null block, a sliding-window group's
blocks outside the window are null)."""

from __future__ import annotations

import time

import pytest
import torch

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView, TransferResults
from kvconnect.backends.cpu_offload import CpuOffloadScheduler, CpuOffloadWorker
from kvconnect.backends.cpu_offload import groups as G
from kvconnect.backends.cpu_offload.index import SlotIndex
from kvconnect.backends.cpu_offload.policies import make_policy
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError, LayoutError
from kvconnect.layout import KVLayout
from tests.unit.offload_harness import LAYOUTS, block_content, block_view, make_cache

pytestmark = pytest.mark.unit

BS = 4
WINDOW = 8  # tokens: a hit ending at block n needs sliding-window blocks n-2 and n-1
KINDS = ("sliding_window", "sliding_window", "full_attention")
NULL = 0


class HybridEngine:
    """Two layer positions; three groups share each position's tensor, as vLLM lays them out."""

    def __init__(self, store_mode: str = "finish", slots: int = 64, num_blocks: int = 64) -> None:
        self.dims = LAYOUTS["mha"]
        self.tensors = [make_cache("mha", num_blocks, BS) for _ in range(2)]
        for t in self.tensors:
            t.fill_(7)  # the null block (and every unused block) holds a sentinel
        caches = {
            f"g{g}.l{p}": (t, KVLayout.of_tensor(t, self.dims, group=g))
            for g in range(3) for p, t in enumerate(self.tensors)
        }
        per_block = sum(lay.block_bytes for _, lay in caches.values())
        self.info = EngineInfo("sim", block_sizes=(BS,) * 3, kv_bytes_per_block=per_block,
                               group_kinds=KINDS, sliding_windows=(WINDOW, WINDOW, 0), null_block_id=NULL)
        cfg = CpuOffloadConfig(cpu_bytes_to_use=slots * per_block // 3, store_mode=store_mode)
        self.sched = CpuOffloadScheduler(cfg, self.info)
        self.worker = CpuOffloadWorker(cfg, self.info)
        self.worker.register_kv_caches(caches)
        self.sched.set_handshake_metadata({0: self.worker.get_handshake_metadata()})
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is the null block
        self.metas = []
        #: Block ids of each request as allocated (before any left the window).
        self.admitted: dict[str, list[list[int]]] = {}

    def alloc(self, n_blocks: int, first_real: int = 0) -> list[list[int]]:
        """Per group: full attention gets every block, sliding window nulls before ``first_real``."""
        return [[NULL if (KINDS[g] == "sliding_window" and i < first_real) else self.free.pop()
                 for i in range(n_blocks)] for g in range(3)]

    def write(self, tokens: list[int], blocks: list[list[int]], lo: int, hi: int) -> None:
        """The "forward pass": block i of group g holds a function of the prefix, group and layer."""
        for g in range(3):
            for i in range(lo, hi):
                if blocks[g][i] == NULL:
                    continue
                for p, t in enumerate(self.tensors):
                    dst = block_view(t, self.dims, blocks[g][i])
                    dst.copy_(self.truth(tokens, i, g, p, tuple(dst.shape)))

    def truth(self, tokens: list[int], i: int, g: int, p: int, shape) -> torch.Tensor:
        return block_content(shape, self.tensors[0].dtype, tokens[: (i + 1) * BS], p, g)

    def holds_truth(self, tokens: list[int], blocks: list[list[int]], g: int, i: int) -> bool:
        for p, t in enumerate(self.tensors):
            got = block_view(t, self.dims, blocks[g][i])
            if not torch.equal(
                got.view(torch.uint8), self.truth(tokens, i, g, p, tuple(got.shape)).view(torch.uint8)
            ):
                return False
        return True

    def worker_step(self, meta) -> TransferResults:
        self.metas.append(meta)
        self.worker.bind_step_metadata(meta)
        self.worker.start_load_kv()
        self.worker.wait_for_save()
        res = TransferResults()
        for _ in range(2000):
            r = self.worker.get_transfer_results(set())
            for f in (
                "finished_sending",
                "finished_recving",
                "failed_recving",
                "invalid_block_ids",
                "failed_sending",
            ):
                getattr(res, f).update(getattr(r, f))
            if not self.worker._inflight and not self.worker._closed:
                break
            time.sleep(0.001)
        self.worker.clear_step_metadata()
        self.sched.update_worker_output(res)
        return res

    def run(self, rid: str, tokens: list[int], steps: int = 1) -> tuple[int, list[list[int]]]:
        """Admit, compute the prompt in ``steps`` chunks (nulling sliding-window blocks that leave
        the window between steps, as vLLM does), finish, and wait for the stores."""
        view = RequestView(rid, tokens)
        hit, _ = self.sched.get_num_new_matched_tokens(view, 0)
        n_blocks = -(-len(tokens) // BS)
        blocks = self.alloc(n_blocks, first_real=G.GroupRule(G.SLIDING, WINDOW).first_needed(hit // BS, BS))
        self.sched.update_state_after_alloc(view, blocks, hit)
        self.admitted[rid] = [list(b) for b in blocks]
        if hit:
            res = self.worker_step(self.sched.build_step_metadata(StepView()))
            assert rid in res.finished_recving and not res.failed_recving
        computed = hit
        bounds = [hit + (len(tokens) - hit) * (k + 1) // steps for k in range(steps)]
        for k, stop in enumerate(bounds):
            alive = G.GroupRule(G.SLIDING, WINDOW).first_alive(computed, BS)
            for g in range(2):  # what remove_skipped_blocks does before the step
                blocks[g][:alive] = [NULL] * alive
            self.write(tokens, blocks, computed // BS, -(-stop // BS))
            sr = ScheduledRequest(rid, [list(b) for b in blocks] if k == 0 else [[], [], []], computed,
                                  stop - computed, is_new=k == 0)
            self.worker_step(self.sched.build_step_metadata(StepView([sr])))
            computed = stop
        alive = G.GroupRule(G.SLIDING, WINDOW).first_alive(computed, BS)
        for g in range(2):
            blocks[g][:alive] = [NULL] * alive
        view.finish_reason = "stop"
        delay, _ = self.sched.request_finished(view, [list(b) for b in blocks])
        if delay:
            res = self.worker_step(self.sched.build_step_metadata(StepView()))
            assert rid in res.finished_sending and not res.failed_sending
        return hit, blocks

    def stores(self) -> list:
        return [s for m in self.metas for s in m.stores]

    def loads(self) -> list:
        return [j for m in self.metas for j in m.loads]


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_store_keeps_every_full_attention_block_and_only_the_window_of_sliding_groups():
    e = HybridEngine()
    _, blocks = e.run("a", toks(20))
    (job,) = e.stores()
    stored = sorted(zip(job.groups, job.block_ids))
    assert NULL not in job.block_ids
    # full attention (group 2): all five blocks; sliding window: blocks 3 and 4 (inside 8 tokens of 20)
    assert [b for g, b in stored if g == 2] == sorted(blocks[2])
    for g in (0, 1):
        assert [b for gg, b in stored if gg == g] == sorted(blocks[g][3:5])
    assert len(set(job.keys)) == len(job.keys) == 9  # a key per group and block
    e.worker.shutdown()


def test_hit_loads_each_group_byte_for_byte_and_never_touches_the_null_block():
    e = HybridEngine()
    a = toks(20)
    e.run("a", a)
    b = a + toks(5, 100)
    hit, _ = e.run("b", b)
    blocks = e.admitted["b"]
    assert hit == 20
    (job,) = e.loads()
    assert NULL not in job.block_ids and job.error is None
    assert sorted(job.groups) == [0, 0, 1, 1, 2, 2, 2, 2, 2]
    for i in range(5):
        assert e.holds_truth(a, blocks, 2, i)
    for g in (0, 1):
        for i in (3, 4):
            assert e.holds_truth(a, blocks, g, i)
    for t in e.tensors:  # the null block still holds the sentinel
        assert torch.all(block_view(t, e.dims, NULL) == 7)
    assert e.sched.get_stats()["loaded_tokens"] == 20
    e.worker.shutdown()


def test_no_hit_where_a_sliding_window_group_lacks_its_window():
    e = HybridEngine()
    a = toks(20)
    e.run("a", a)
    # shares blocks 0..2 with "a": the full-attention group has them, but "a" kept sliding-window
    # blocks 3 and 4 only, and a hit ending at block 1, 2 or 3 needs sliding-window blocks before 3
    c = a[:12] + toks(8, 500)
    hit, _ = e.run("c", c)
    assert hit == 0
    assert not e.loads()
    e.worker.shutdown()


def test_fill_mode_stores_sliding_window_blocks_while_inside_the_window_so_shorter_prefixes_hit():
    e = HybridEngine(store_mode="fill")
    a = toks(20)
    e.run("a", a, steps=5)  # 4 tokens a step: every block is stored while alive
    stored = {(g, b) for s in e.stores() for g, b in zip(s.groups, s.block_ids)}
    assert NULL not in {b for _, b in stored}
    assert len(stored) == 15  # 5 blocks x 3 groups
    c = a[:12] + toks(8, 500)
    hit, _ = e.run("c", c)
    blocks_c = e.admitted["c"]
    assert hit == 12
    load = e.loads()[-1]
    assert NULL not in load.block_ids
    assert sorted(load.groups) == [0, 0, 1, 1, 2, 2, 2]  # window blocks 1, 2; full blocks 0..2
    for i in range(3):
        assert e.holds_truth(a, blocks_c, 2, i)
    for g in (0, 1):
        assert blocks_c[g][0] == NULL  # outside the window at 12 tokens: the engine keeps nothing
        for i in (1, 2):
            assert e.holds_truth(a, blocks_c, g, i)
    e.worker.shutdown()


def test_group_keys_differ_per_group_and_group_zero_keeps_the_plain_prefix_key():
    k = bytes(range(16))
    assert G.group_key(k, 0) == k
    assert len({G.group_key(k, g) for g in range(4)}) == 4


def test_longest_hit_needs_every_group():
    idx = SlotIndex(32, make_policy("lru", 32))
    rules = (G.GroupRule(G.SLIDING, WINDOW), G.GroupRule(G.FULL))
    base = [bytes([i]) * 16 for i in range(6)]

    def keys(g, n):
        return [G.group_key(k, g) for k in base[:n]]

    def put(ks):
        slots = idx.reserve(ks)
        idx.commit(slots, ks)

    put(keys(1, 6))  # the full-attention group has every block
    assert G.longest_hit(idx, keys, rules, 0, 6, BS) == (0, [])  # sliding window has none
    put(keys(0, 4)[2:4])  # sliding-window blocks 2, 3: the window of a hit ending at block 4
    n, entries = G.longest_hit(idx, keys, rules, 0, 6, BS)
    assert n == 4
    assert sorted((g, i) for g, i, _, _ in entries) == [(0, 2), (0, 3)] + [(1, i) for i in range(4)]


def test_a_group_of_another_attention_kind_fails_at_start_naming_it():
    info = EngineInfo("e", block_sizes=(BS, BS), group_kinds=("full_attention", "MambaSpec"),
                      kv_bytes_per_block=200)
    with pytest.raises(ConfigError, match="group 1 uses 'MambaSpec' attention"):
        CpuOffloadScheduler(CpuOffloadConfig(cpu_bytes_to_use=10_000), info)


def test_several_groups_without_attention_kinds_fail_at_start():
    info = EngineInfo("e", block_sizes=(BS, BS), kv_bytes_per_block=200)
    with pytest.raises(ConfigError, match="group_kinds"):
        CpuOffloadScheduler(CpuOffloadConfig(cpu_bytes_to_use=10_000), info)


def test_worker_refuses_groups_whose_layers_do_not_line_up():
    info = EngineInfo("e", block_sizes=(BS, BS), group_kinds=("sliding_window", "full_attention"),
                      sliding_windows=(WINDOW, 0))
    t1, t2, t3 = (make_cache("mha", 4, BS) for _ in range(3))
    caches = {"a": (t1, KVLayout.of_tensor(t1, LAYOUTS["mha"], group=0)),
              "b": (t2, KVLayout.of_tensor(t2, LAYOUTS["mha"], group=1)),
              "c": (t3, KVLayout.of_tensor(t3, LAYOUTS["mha"], group=1))}
    w = CpuOffloadWorker(CpuOffloadConfig(cpu_bytes_to_use=1 << 20), info)
    with pytest.raises(LayoutError, match="group 1 has 2 layers, group 0 has 1"):
        w.register_kv_caches(caches)
