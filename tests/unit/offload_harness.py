"""Test-only engine simulator for the CPU offload backend: drives one scheduler half and one
worker half per TP rank in the call order of ``kvconnect.api``, with a toy block allocator and a
"forward pass" that writes KV as a pure function of the token prefix (so two requests sharing a
prefix produce identical blocks, as a real model would)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch

from kvconnect.aggregator import FinishedAggregator
from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView, TransferResults
from kvconnect.backends.cpu_offload import CpuOffloadScheduler, CpuOffloadWorker
from kvconnect.config import CpuOffloadConfig
from kvconnect.layout import FLASH_NHD_DIMS, MLA_DIMS, VLLM_CPU_DIMS, KVLayout

LAYOUTS = {
    "mha": FLASH_NHD_DIMS,  # [2, blocks, tokens, heads, dim]
    "mla": MLA_DIMS,  # [blocks, tokens, latent]
    "vllm_cpu": VLLM_CPU_DIMS,  # [blocks, heads, tokens, 2*dim]
}


def make_cache(kind: str, num_blocks: int, block_size: int, heads: int = 2, dim: int = 8,
               dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> torch.Tensor:
    shape = {
        "mha": (2, num_blocks, block_size, heads, dim),
        "mla": (num_blocks, block_size, dim),
        "vllm_cpu": (num_blocks, heads, block_size, 2 * dim),
    }[kind]
    return torch.zeros(shape, dtype=dtype, device=device)


def block_view(t: torch.Tensor, dims: tuple[str, ...], block_id: int) -> torch.Tensor:
    return t.movedim(dims.index("block"), 0)[block_id]


def block_content(shape: tuple[int, ...], dtype: torch.dtype, tokens: list[int], layer: int,
                  rank: int) -> torch.Tensor:
    seed = zlib.crc32(repr((tokens, layer, rank)).encode())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@dataclass
class SimRequest:
    view: RequestView
    blocks: list[int]
    hit_tokens: int = 0
    computed: int = 0
    loading: bool = False
    load_failed: bool = False
    started: bool = False
    finished: bool = False
    freed: bool = False


@dataclass
class OffloadEngine:
    config: CpuOffloadConfig
    kind: str = "mha"
    num_blocks: int = 64
    block_size: int = 4
    num_layers: int = 2
    tp_size: int = 1
    use_hint: bool = False
    #: where the engine's KV caches live ("cpu", "cuda")
    device: str = "cpu"
    kv_events: bool = False
    requests: dict[str, SimRequest] = field(default_factory=dict)
    results: list[TransferResults] = field(default_factory=list)

    def __post_init__(self) -> None:
        dims = LAYOUTS[self.kind]
        self.dims = dims
        self.caches: list[dict[str, tuple[torch.Tensor, KVLayout]]] = []
        for _ in range(self.tp_size):
            c = {}
            for layer in range(self.num_layers):
                t = make_cache(self.kind, self.num_blocks, self.block_size, device=self.device)
                c[f"layer.{layer}"] = (t, KVLayout.of_tensor(t, dims))
            self.caches.append(c)
        per_block = sum(lay.block_bytes for _, lay in self.caches[0].values())
        sig = {"kv_bytes_per_block": per_block} if self.use_hint else {}
        self.infos = [
            EngineInfo("sim", tp_size=self.tp_size, tp_rank=r, block_sizes=(self.block_size,),
                       model_signature=sig, kv_events=self.kv_events)
            for r in range(self.tp_size)
        ]
        self.sched = CpuOffloadScheduler(self.config, self.infos[0])
        self.workers = [CpuOffloadWorker(self.config, info) for info in self.infos]
        for w, c in zip(self.workers, self.caches):
            w.register_kv_caches(c)
        self.sched.set_handshake_metadata({r: w.get_handshake_metadata() for r, w in enumerate(self.workers)})
        self.agg = FinishedAggregator(self.tp_size)
        self.free = list(range(self.num_blocks - 1, -1, -1))
        self._finished: set[str] = set()
        self._preempted: set[str] = set()

    # -- engine side ------------------------------------------------------------------------------
    def add(self, rid: str, tokens: list[int], cache_salt: str | None = None,
            block_hashes: list[bytes] | None = None) -> int:
        view = RequestView(rid, list(tokens), cache_salt=cache_salt, block_hashes=block_hashes)
        n, is_async = self.sched.get_num_new_matched_tokens(view, 0)
        assert n is not None
        n_blocks = -(-len(tokens) // self.block_size)
        blocks = [self.free.pop() for _ in range(n_blocks)]
        self.sched.update_state_after_alloc(view, [blocks], n)
        req = SimRequest(view, blocks, hit_tokens=n, computed=n, loading=n > 0)
        assert is_async == (n > 0)
        self.requests[rid] = req
        return n

    def finish(self, rid: str, reason: str = "stop") -> bool:
        req = self.requests[rid]
        req.view.finish_reason = reason
        delay, params = self.sched.request_finished(req.view, [req.blocks])
        req.finished = True
        self._finished.add(rid)
        if not delay:
            self._free(req)
        return delay

    def preempt(self, rid: str) -> None:
        req = self.requests[rid]
        self._free(req)
        req.blocks, req.computed, req.started, req.freed = [], 0, False, False
        self._preempted.add(rid)

    def _free(self, req: SimRequest) -> None:
        if not req.freed:
            req.freed = True
            self.free.extend(req.blocks)

    def _forward(self, req: SimRequest, start: int, stop: int) -> None:
        bs = self.block_size
        toks = list(req.view.prompt_token_ids)
        for b in range(start // bs, -(-stop // bs)):
            for rank, caches in enumerate(self.caches):
                for layer, (t, _) in enumerate(caches.values()):
                    dst = block_view(t, self.dims, req.blocks[b])
                    dst.copy_(block_content(tuple(dst.shape), t.dtype, toks[: (b + 1) * bs], layer, rank))

    def step(self) -> TransferResults:
        scheduled = []
        for req in self.requests.values():
            if req.finished or req.loading or req.computed >= len(req.view.prompt_token_ids):
                continue
            if not req.blocks:  # resumed after preemption
                req.blocks = [
                    self.free.pop() for _ in range(-(-len(req.view.prompt_token_ids) // self.block_size))
                ]
            n = len(req.view.prompt_token_ids) - req.computed
            scheduled.append(
                ScheduledRequest(
                    req.view.request_id,
                    [list(req.blocks)] if not req.started else [[]],
                    req.computed,
                    n,
                    is_new=not req.started,
                )
            )
        step = StepView(scheduled, set(self._finished), set(self._preempted))
        self._finished.clear()
        self._preempted.clear()
        meta = self.sched.build_step_metadata(step)
        for w in self.workers:
            w.bind_step_metadata(meta)
            w.start_load_kv()
        for sr in scheduled:
            req = self.requests[sr.request_id]
            self._forward(req, sr.num_computed_tokens, sr.num_computed_tokens + sr.num_scheduled_tokens)
            req.started = True
            req.computed += sr.num_scheduled_tokens
        outs = []
        for w in self.workers:
            w.wait_for_save()
            outs.append(w.get_transfer_results(set()))
            w.clear_step_metadata()
        res = self.agg.aggregate(outs)
        self.sched.update_worker_output(res)
        for rid in res.finished_recving:
            req = self.requests[rid]
            req.loading = False
            if rid in res.failed_recving:
                req.load_failed = True
                req.computed = 0  # recompute policy
        for rid in res.finished_sending:
            self._free(self.requests[rid])
        self.results.append(res)
        return res

    def busy(self) -> bool:
        return any(
            r.loading
            or (r.finished and not r.freed)
            or (not r.finished and r.computed < len(r.view.prompt_token_ids))
            for r in self.requests.values()
        )

    def drain(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.step()
        while self.busy():
            if time.monotonic() > deadline:
                raise TimeoutError("offload engine did not go idle")
            time.sleep(0.001)
            self.step()

    def run(self, rid: str, tokens: list[int], **kw) -> int:
        """Add a request, compute it, finish it and wait until its stores are done."""
        hit = self.add(rid, tokens, **kw)
        self.drain()
        self.finish(rid)
        self.drain()
        return hit

    # -- checks -----------------------------------------------------------------------------------
    def blocks_match_truth(self, rid: str, upto_blocks: int) -> bool:
        req = self.requests[rid]
        toks = list(req.view.prompt_token_ids)
        bs = self.block_size
        for b in range(upto_blocks):
            for rank, caches in enumerate(self.caches):
                for layer, (t, _) in enumerate(caches.values()):
                    got = block_view(t, self.dims, req.blocks[b]).cpu()
                    want = block_content(tuple(got.shape), t.dtype, toks[: (b + 1) * bs], layer, rank)
                    if not torch.equal(got.view(torch.uint8) if got.dtype != torch.uint8 else got,
                                       want.view(torch.uint8) if want.dtype != torch.uint8 else want):
                        return False
        return True

    def shutdown(self) -> None:
        for w in self.workers:
            w.shutdown()
