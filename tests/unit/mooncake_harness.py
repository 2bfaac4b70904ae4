"""Test-only driver for the mooncake backend on FakeMooncakeDistributedStore: one instance is a
scheduler half plus a worker half over a vLLM-CPU-shaped KV cache, driven in kvconnect.api order."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import torch

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView, TransferResults
from kvconnect.backends.mooncake import MooncakeScheduler, MooncakeWorker
from kvconnect.config import MooncakeConfig
from kvconnect.layout import VLLM_CPU_DIMS, KVLayout
from tests.fakes.fake_mooncake import FakeMooncakeDistributedStore

BS = 32
NUM_BLOCKS = 32


class FakeMaster:
    """A listening socket standing in for the master's RPC port (kvconnect checks it first)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


def config(master: FakeMaster, **kw) -> MooncakeConfig:
    kw.setdefault("connect_timeout_s", 2.0)
    kw.setdefault("retry_interval_s", 0.2)
    return MooncakeConfig(master_server_address=master.address, **kw)


@dataclass
class Instance:
    sched: MooncakeScheduler
    worker: MooncakeWorker
    kv: list[torch.Tensor]
    results: list[TransferResults] = field(default_factory=list)

    def step(self, step: StepView | None = None) -> TransferResults:
        meta = self.sched.build_step_metadata(step or StepView())
        self.worker.bind_step_metadata(meta)
        self.worker.start_load_kv()
        self.worker.wait_for_save()
        out = self.worker.get_transfer_results(set())
        self.worker.clear_step_metadata()
        self.sched.update_worker_output(out)
        self.results.append(out)
        return out

    def lookup(self, req: RequestView, computed: int = 0, timeout_s: float = 5.0) -> tuple[int | None, bool]:
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.sched.get_num_new_matched_tokens(req, computed)
            if r[0] is not None or time.monotonic() > deadline:
                return r
            time.sleep(0.002)

    def compute(self, req: RequestView, blocks: list[int]) -> None:
        """The engine's forward pass: KV as a pure function of the token prefix."""
        toks = list(req.prompt_token_ids)
        for i, b in enumerate(blocks):
            if (i + 1) * BS > len(toks):
                break
            g = torch.Generator().manual_seed(hash(tuple(toks[: (i + 1) * BS])) & 0xFFFFFFFF)
            for layer in self.kv:
                layer[b] = torch.randn(layer.shape[1:], generator=g).to(layer.device)

    def serve_and_store(self, req: RequestView, blocks: list[int]) -> TransferResults:
        """A request with no hit: computed whole, finished, its blocks stored."""
        self.sched.update_state_after_alloc(req, (blocks,), 0)
        n = len(req.prompt_token_ids)
        self.step(StepView(scheduled=[ScheduledRequest(req.request_id, (blocks,), 0, n, True)]))
        self.compute(req, blocks)
        delay, _ = self.sched.request_finished(req, (blocks,))
        assert delay
        return self.wait_for(lambda r: req.request_id in r.finished_sending)

    def wait_for(self, pred, timeout_s: float = 5.0) -> TransferResults:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.step()
            if pred(out):
                return out
            time.sleep(0.005)
        raise AssertionError(f"condition not met in {timeout_s} s; results {self.results[-3:]}")

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.sched.shutdown()


def make_instance(cfg: MooncakeConfig, layers: int = 2, model_name: str = "m", tp_rank: int = 0,
                  engine_id: str = "e", store_factory=FakeMooncakeDistributedStore,
                  kv_events: bool = False, device: str = "cpu") -> Instance:
    eng = EngineInfo(engine_id, block_sizes=(BS,), model_signature={"arch": "tiny"},
                     model_name=model_name, tp_rank=tp_rank, kv_events=kv_events)
    kv = [torch.zeros(NUM_BLOCKS, 2, BS, 16, device=device) for _ in range(layers)]
    w = MooncakeWorker(cfg, eng, store_factory=store_factory)
    w.register_kv_caches({f"l{i}": (t, KVLayout.of_tensor(t, VLLM_CPU_DIMS)) for i, t in enumerate(kv)})
    s = MooncakeScheduler(cfg, eng, store_factory=store_factory)
    s.set_handshake_metadata({0: w.get_handshake_metadata()})
    return Instance(s, w, kv)
