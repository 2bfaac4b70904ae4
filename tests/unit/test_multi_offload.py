"""Two real cpu_offload children under the MultiConnector: both store every block; a later
request loads from the first child that has its prefix, and the loaded bytes are exact."""

from __future__ import annotations

import time
import zlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kvconnect.backends.cpu_offload")

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView, TransferResults  # noqa: E402
from kvconnect.config import parse_config  # noqa: E402
from kvconnect.layout import VLLM_CPU_DIMS, KVLayout  # noqa: E402
from kvconnect.registry import create_scheduler, create_worker  # noqa: E402

pytestmark = pytest.mark.unit

BS, HEADS, DIM, LAYERS, NUM_BLOCKS = 4, 2, 8, 2, 64
BLOCK_BYTES = LAYERS * HEADS * BS * 2 * DIM * 4  # float32, K|V in the last dim


def truth(tokens: list[int], layer: int) -> torch.Tensor:
    """The KV a model would write for the block ending at ``tokens`` (a pure function of the prefix)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((tokens, layer)).encode()))
    return torch.randn((HEADS, BS, 2 * DIM), generator=g)


class Engine:
    """A one-rank engine loop over a MultiScheduler / MultiWorker (the adapter's call order)."""

    def __init__(self, backends: list[dict]) -> None:
        cfg = parse_config({"backends": backends})
        self.info = EngineInfo("e0", block_sizes=(BS,))
        self.sched = create_scheduler(cfg, self.info)
        self.worker = create_worker(cfg, self.info)
        self.caches = {f"layer.{i}": torch.zeros((NUM_BLOCKS, HEADS, BS, 2 * DIM)) for i in range(LAYERS)}
        self.worker.register_kv_caches(
            {n: (t, KVLayout.of_tensor(t, VLLM_CPU_DIMS)) for n, t in self.caches.items()})
        self.sched.set_handshake_metadata({0: self.worker.get_handshake_metadata()})
        self.next_block = 0
        self.metas: list = []
        self.finished: set[str] = set()

    def alloc(self, n: int) -> list[int]:
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return ids

    def step(self, scheduled=(), forward=()) -> TransferResults:
        meta = self.sched.build_step_metadata(StepView(list(scheduled), set(self.finished)))
        self.finished.clear()
        self.metas.append(meta)
        w = self.worker
        w.bind_step_metadata(meta)
        w.start_load_kv()
        for layer, name in enumerate(self.caches):
            w.wait_for_layer_load(name)
            for tokens, block_ids, first, last in forward:
                for b in range(first, last):
                    self.caches[name][block_ids[b]].copy_(truth(tokens[: (b + 1) * BS], layer))
            w.save_kv_layer(name, self.caches[name])
        w.wait_for_save()
        res = w.get_transfer_results(set())
        w.clear_step_metadata()
        self.sched.update_worker_output(res)
        return res

    def until(self, pred, what: str) -> TransferResults:
        deadline = time.monotonic() + 10
        while True:
            res = self.step()
            if pred(res):
                return res
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.002)

    def run(self, rid: str, tokens: list[int]) -> tuple[int, list[int]]:
        """Admit, (load,) compute, finish and wait for the stores; returns (hit tokens, blocks)."""
        view = RequestView(rid, tokens)
        n, is_async = self.sched.get_num_new_matched_tokens(view, 0)
        blocks = self.alloc(-(-len(tokens) // BS))
        self.sched.update_state_after_alloc(view, [blocks], n)
        if n:
            assert is_async
            res = self.until(lambda r: rid in r.finished_recving, f"load of {rid}")
            assert rid not in res.failed_recving
            self.loaded = [self.caches[name][blocks[: n // BS]].clone() for name in self.caches]
        sr = ScheduledRequest(rid, [blocks], n, len(tokens) - n, is_new=True)
        self.step([sr], [(tokens, blocks, n // BS, -(-len(tokens) // BS))])
        delay, _ = self.sched.request_finished(view, [blocks])
        self.finished.add(rid)
        if delay:
            self.until(lambda r: rid in r.finished_sending, f"stores of {rid}")
        return n, blocks


def prompt(seed: int, n: int = 13) -> list[int]:
    return [(seed * 131 + i * 7) % 1000 for i in range(n)]


@pytest.fixture
def engine():
    e = Engine([
        {"backend": "cpu_offload", "cpu_bytes_to_use": 3 * BLOCK_BYTES},   # 3 slots: evicts soon
        {"backend": "cpu_offload", "cpu_bytes_to_use": 64 * BLOCK_BYTES},
    ])
    yield e
    e.sched.shutdown()
    e.worker.shutdown()


def assert_loaded_exactly(e: Engine, tokens: list[int], n_blocks: int) -> None:
    for layer, got in enumerate(e.loaded):
        assert got.shape[0] == n_blocks
        for b in range(n_blocks):
            want = truth(tokens[: (b + 1) * BS], layer)
            assert torch.equal(got[b].view(torch.uint8), want.view(torch.uint8)), (layer, b)


def test_both_offload_children_store_and_the_first_with_a_hit_loads(engine):
    e = engine
    assert e.sched.names == ["cpu_offload#1", "cpu_offload#2"]
    p1 = prompt(1)
    assert e.run("r1", p1)[0] == 0
    assert any(m.deferred.get("r1") == (0, 1) for m in e.metas)  # both children stored r1
    stats = e.sched.get_stats()
    assert stats["cpu_offload#1"]["stored_blocks"] == 3 and stats["cpu_offload#2"]["stored_blocks"] == 3

    hit, _ = e.run("r2", p1)
    assert hit == 12
    load_meta = next(m for m in e.metas if "r2" in m.loads)
    assert load_meta.loads["r2"].child == 0
    assert_loaded_exactly(e, p1, 3)
    stats = e.sched.get_stats()
    assert stats["cpu_offload#1"]["hits"] == 1 and stats["cpu_offload#2"]["hits"] == 0


def test_a_prefix_evicted_from_the_first_child_loads_from_the_second(engine):
    e = engine
    p1, p3 = prompt(1), prompt(3)
    e.run("r1", p1)
    e.run("r3", p3)  # fills the small first child with r3's blocks: r1's are evicted there
    hit, _ = e.run("r4", p1)
    assert hit == 12
    load_meta = next(m for m in e.metas if "r4" in m.loads)
    assert load_meta.loads["r4"].child == 1
    assert_loaded_exactly(e, p1, 3)
    stats = e.sched.get_stats()
    assert stats["cpu_offload#1"]["hits"] == 0 and stats["cpu_offload#2"]["hits"] == 1
