"""Drive P/D producer and consumer engines in one process, the way an engine calls kvconnect:
scheduler half + one worker per TP rank + the finished-transfer aggregator, with real KV
tensors on the fake NIXL agent (or real NIXL). Plus an independent byte-for-byte checker."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kvconnect.aggregator import FinishedAggregator
from kvconnect.api import EngineInfo, RequestView, StepView
from kvconnect.backends.nixl import NixlScheduler, NixlWorker
from kvconnect.config import NixlConfig
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, VLLM_CPU_DIMS, KVLayout, rank_heads
from kvconnect.testing.ports import free_port_range

DIMS = {"flash": FLASH_NHD_DIMS, "hnd": FLASH_HND_DIMS, "cpu": VLLM_CPU_DIMS, "mla": MLA_DIMS}
HEAD_DIM = 8
LATENT = 24
DEADLINE_S = 30.0  # bounds a hang; success returns at once, so a loaded CI machine has room


def make_layer(kind: str, num_blocks: int, block_size: int, heads: int, group: int = 0, dtype=torch.float32,
               device: str = "cpu"):
    dims = DIMS[kind]
    if kind == "flash":
        shape: tuple[int, ...] = (2, num_blocks, block_size, heads, HEAD_DIM)
    elif kind == "hnd":
        shape = (2, num_blocks, heads, block_size, HEAD_DIM)
    elif kind == "cpu":
        shape = (num_blocks, heads, block_size, 2 * HEAD_DIM)
    else:
        shape = (num_blocks, block_size, LATENT)
    t = torch.zeros(shape, dtype=dtype, device=device)
    return t, KVLayout.of_tensor(t, dims, group=group)


@dataclass
class Req:
    request_id: str
    prompt: list[int]
    params: dict[str, Any] | None
    finish_reason: str | None = None

    def view(self) -> RequestView:
        return RequestView(
            self.request_id, self.prompt, transfer_params=self.params, finish_reason=self.finish_reason
        )


@dataclass
class Engine:
    """One engine instance: a scheduler half and ``tp`` worker halves."""

    name: str
    tp: int = 1
    kind: str = "flash"
    num_heads: int = 4
    block_size: int = 16
    num_blocks: int = 24
    groups: int = 1
    mode: str = "pull"
    options: dict[str, Any] = field(default_factory=dict)
    agent_factory: Any = None
    config_factory: Any = None
    #: tensor block size when it differs from the engine block size (kernel blocks)
    tensor_block_size: int | None = None
    #: where the KV caches live ("cpu", "cuda", "cuda:1")
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.agent_factory is None:
            from tests.fakes import fake_nixl

            self.agent_factory, self.config_factory = fake_nixl.FakeNixlAgent, fake_nixl.nixl_agent_config
        self.port = free_port_range(self.tp)
        opts = dict(
            mode=self.mode, side_channel_port=self.port, handshake_timeout_s=2.0, transfer_timeout_s=3.0,
            lease_timeout_s=5.0, poll_interval_s=0.0005, idle_poll_interval_s=0.005,
        )
        opts.update(self.options)
        self.cfg = NixlConfig(**opts)
        bss = (self.block_size,) * self.groups
        layer_groups = tuple((f"layer{g}",) for g in range(self.groups))
        self.sched = NixlScheduler(self.cfg, self._info(0, bss, layer_groups))
        self.workers: list[NixlWorker] = []
        self.caches: list[dict[str, tuple[torch.Tensor, KVLayout]]] = []
        tbs = self.tensor_block_size or self.block_size
        per = self.block_size // tbs
        for r in range(self.tp):
            lo, hi = (0, 1) if self.kind == "mla" else rank_heads(self.num_heads, self.tp, r)
            caches = {}
            for li in range(2):
                g = li % self.groups
                caches[f"layer{li}"] = make_layer(self.kind, self.num_blocks * per, tbs, hi - lo, group=g,
                                                  device=self.device)
            w = NixlWorker(self.cfg, self._info(r, bss, layer_groups),
                           agent_factory=self.agent_factory, config_factory=self.config_factory)
            w.register_kv_caches(caches)
            self.workers.append(w)
            self.caches.append(caches)
        self.agg = FinishedAggregator(self.tp)
        self.sending: set[str] = set()
        self.recving: set[str] = set()
        self.failed: set[str] = set()
        self.invalid: set[int] = set()
        self.stats: dict[str, float] = {}

    def _info(self, rank: int, bss, layer_groups) -> EngineInfo:
        return EngineInfo(
            engine_id=self.name,
            tp_size=self.tp,
            tp_rank=rank,
            block_sizes=bss,
            model_signature={"model": "tiny", "kind": self.kind},
            num_kv_heads=1 if self.kind == "mla" else self.num_heads,
            layer_groups=layer_groups if self.groups > 1 else (),
        )

    def fill(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        for caches in self.caches:
            for t, _ in caches.values():
                t.copy_(torch.randn(t.shape, generator=gen))

    def fill_bytes(self, seed: int = 0) -> None:
        """Every byte of every cache uniformly random (any float bit pattern, NaNs included:
        compare with :func:`as_bytes`), drawn on the CPU so a device gets the same bytes."""
        gen = torch.Generator().manual_seed(seed)
        for caches in self.caches:
            for t, _ in caches.values():
                t.view(-1).view(torch.uint8).copy_(
                    torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=gen))
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)  # the transfer engine reads outside torch's streams

    def agent(self, rank: int = 0):
        return self.workers[rank]._transport.agent

    def step(self) -> None:
        meta = self.sched.build_step_metadata(StepView())
        for w in self.workers:
            w.bind_step_metadata(meta)
        out = self.agg.aggregate([w.get_transfer_results(set()) for w in self.workers])
        self.sched.update_worker_output(out)
        self.sending |= out.finished_sending
        self.recving |= out.finished_recving
        self.failed |= out.failed_recving
        self.invalid |= out.invalid_block_ids
        for k, v in (out.stats or {}).items():
            if isinstance(v, (int, float)):
                self.stats[k] = self.stats.get(k, 0) + v

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()
        self.sched.shutdown()


def run_until(engines, cond, timeout: float = DEADLINE_S) -> bool:
    """Step every engine until ``cond()``; False at the deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in engines:
            e.step()
        if cond():
            return True
        time.sleep(0.002)
    return False


def prefill(producer: Engine, rid: str, prompt_len: int, block_ids: list[list[int]], finish: str = "length"):
    """Run one request through the producer's scheduler the way vLLM does; returns
    ``(delay_free, params)``."""
    req = Req(rid, list(range(prompt_len)), {"do_remote_decode": True})
    s = producer.sched
    assert s.get_num_new_matched_tokens(req.view(), 0) == (0, False)
    s.update_state_after_alloc(req.view(), block_ids, 0)
    producer.step()
    req.finish_reason = finish
    return s.request_finished(req.view(), block_ids)


def decode_start(
    consumer: Engine, rid: str, prompt_len: int, params, block_ids: list[list[int]], computed: int = 0
):
    req = Req(rid, list(range(prompt_len)), params)
    n, is_async = consumer.sched.get_num_new_matched_tokens(req.view(), computed)
    consumer.sched.update_state_after_alloc(req.view(), block_ids, n or 0)
    return n, is_async


# -- independent checker ------------------------------------------------------------------------
def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """The bytes of ``x`` on the CPU, last dimension widened by the item size: two tensors are
    byte-identical iff these are ``torch.equal`` (float equality would pass 0.0 == -0.0 and fail
    NaN == NaN)."""
    return x.contiguous().cpu().view(torch.uint8)


def _canon(t: torch.Tensor, lay: KVLayout) -> torch.Tensor:
    """[block, kv, head, token, feature] view whatever the layout."""
    x, dims = t, list(lay.dims)
    for d in ("kv", "head"):
        if d not in dims:
            x = x.unsqueeze(-1)
            dims.append(d)
    return x.permute([dims.index(d) for d in ("block", "kv", "head", "token", "feature")])


def token_view(t: torch.Tensor, lay: KVLayout, engine_bs: int, ids, t0: int, t1: int) -> torch.Tensor:
    """[tokens, kv, head, feature] of tokens t0..t1 of a request with engine block ids ``ids``."""
    c = _canon(t, lay)
    tb = lay.block_size
    tok = torch.arange(t0, t1)
    eng = torch.tensor(list(ids))[tok // engine_bs]
    blk = eng * (engine_bs // tb) + (tok % engine_bs) // tb
    return c[blk, :, :, tok % tb, :]


def assert_transferred(
    producer: Engine, consumer: Engine, p_ids, c_ids, t0: int, t1: int, group=None
) -> None:
    """Every consumer rank holds, for tokens t0..t1, exactly the producer's KV of its heads
    (only the layers of ``group`` when given)."""
    for c in range(consumer.tp):
        for name, (ct, clay) in consumer.caches[c].items():
            g = clay.group
            if group is not None and g != group:
                continue
            got = token_view(ct, clay, consumer.block_size, c_ids[g], t0, t1)
            if consumer.kind == "mla":
                pt, play = producer.caches[0][name]
                want = token_view(pt, play, producer.block_size, p_ids[g], t0, t1)
                assert torch.equal(as_bytes(got), as_bytes(want)), f"rank {c} {name}: MLA KV differs"
                continue
            lo, hi = rank_heads(consumer.num_heads, consumer.tp, c)
            for gh in range(lo, hi):
                p = next(
                    p
                    for p in range(producer.tp)
                    if rank_heads(producer.num_heads, producer.tp, p)[0]
                    <= gh
                    < rank_heads(producer.num_heads, producer.tp, p)[1]
                )
                plo = rank_heads(producer.num_heads, producer.tp, p)[0]
                pt, play = producer.caches[p][name]
                want = token_view(pt, play, producer.block_size, p_ids[g], t0, t1)[:, :, gh - plo]
                assert torch.equal(as_bytes(got[:, :, gh - lo]), as_bytes(want)), \
                    f"consumer rank {c} {name} head {gh} differs"

