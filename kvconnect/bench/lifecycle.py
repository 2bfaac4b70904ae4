"""The scripted request lifecycle of ``kvconnect bench scheduler`` (its module docstring describes
it): request specs for each workload, and enough of vLLM's scheduler to call a connector in vLLM's
order with vLLM's objects, timing only the connector's calls."""

from __future__ import annotations

import argparse
import copy
import gc
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kvconnect.bench.vllm_env import Env
from kvconnect.errors import BenchmarkError


@dataclass
class Spec:
    rid: str
    tokens: list[int]
    out_len: int
    params: dict | None
    hashes: list = field(default_factory=list)


def make_specs(a: argparse.Namespace, workload: str, env: Env) -> list[Spec]:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    rng = random.Random(a.seed)
    docs = [[rng.randrange(1, 1000) for _ in range(a.prompt_max)] for _ in range(8)]
    producer = workload.endswith("producer")
    consumer = workload.endswith("consumer")
    bs = env.block_size
    specs = []
    for i in range(a.requests):
        n = rng.randint(a.prompt_min, a.prompt_max)
        if workload == "offload" and rng.random() < 0.7:
            shared = n // 2
            tokens = docs[rng.randrange(len(docs))][:shared] + [
                rng.randrange(1, 1000) for _ in range(n - shared)
            ]
        else:
            tokens = [rng.randrange(1, 1000) for _ in range(n)]
        params = None
        if producer:
            params = {"do_remote_decode": True}
        elif consumer:
            nb = -(-n // bs)
            params = {
                "do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [[rng.randrange(env.num_blocks) for _ in range(nb)]],
                "remote_engine_id": "bench-prefill", "remote_request_id": f"p-{i}",
                "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1, "dcp_size": 1, "pp_size": 1,
                "remote_num_tokens": n, "remote_blocks_expiry_time": None, "transfer_mode": "pull",
                "remote_block_size": bs,
            }
        out_len = 1 if producer else rng.randint(a.decode_min, a.decode_max)
        spec = Spec(f"req-{i}", tokens, out_len, params)
        r = Request(spec.rid, list(tokens), SamplingParams(max_tokens=out_len), None, block_hasher=env.hasher)
        spec.hashes = list(r.block_hashes)
        specs.append(spec)
    return specs


def _request(spec: Spec, env: Env) -> Any:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    extra = {"kv_transfer_params": copy.deepcopy(spec.params)} if spec.params is not None else None
    r = Request(spec.rid, list(spec.tokens), SamplingParams(max_tokens=spec.out_len, extra_args=extra), None)
    r.block_hashes = list(spec.hashes)
    r._block_hasher = env.hasher  # output blocks are hashed as tokens are appended, as vLLM does
    return r


CALLS = ("lookup", "alloc", "meta", "finished", "output", "new")


class Engine:
    """Enough of vLLM's scheduler to call a connector in vLLM's order with vLLM's objects."""

    def __init__(self, conn: Any, env: Env, specs: list[Spec], a: argparse.Namespace) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA
        from vllm.v1.core.block_pool import BlockPool

        self.conn, self.env, self.a = conn, env, a
        self.hma = isinstance(conn, SupportsHMA)
        self.specs = deque(specs)
        # vLLM's own block pool: blocks come out of its free queue the way the engine hands them to
        # a connector (just touched by the allocation), in the shuffled order of a pool that has
        # been serving for a while.
        self.pool = BlockPool(env.num_blocks, enable_caching=True, hash_block_size=env.block_size)
        every = self.pool.get_new_blocks(self.pool.get_num_free_blocks())
        random.Random(a.seed).shuffle(every)
        self.pool.free_blocks(every)
        self.waiting: deque = deque()
        self.remote: dict[str, Any] = {}  # WAITING_FOR_REMOTE_KVS
        self.running: dict[str, Any] = {}
        self.blocks: dict[str, list[Any]] = {}  # vLLM KVCacheBlocks per request
        self.finished_ids: set[str] = set()
        self.due: dict[int, tuple[set[str], set[str]]] = {}
        self.held: dict[str, int] = {}
        self.t = dict.fromkeys(CALLS, 0.0)
        self.request_steps = 0
        self.steps = 0
        self.ext_tokens = 0
        self.deferred = 0

    def _alloc(self, rid: str, n_tokens: int) -> list[int]:
        """Allocate up to ``n_tokens``; the new blocks' ids (the engine's own, untimed, read)."""
        have = self.blocks.setdefault(rid, [])
        need = -(-n_tokens // self.env.block_size) - len(have)
        new = self.pool.get_new_blocks(max(0, need))
        have.extend(new)
        return [b.block_id for b in new]

    def _ids(self, rid: str) -> list[int]:
        return [b.block_id for b in self.blocks[rid]]

    def _kvblocks(self, rid: str) -> Any:
        from vllm.v1.core.kv_cache_manager import KVCacheBlocks

        return KVCacheBlocks((list(self.blocks[rid]),))

    def _free(self, rid: str) -> None:
        # vLLM frees a request's blocks tail first, so its last blocks are reused first.
        self.pool.free_blocks(reversed(self.blocks.pop(rid, [])))

    def _report(self, step: int, sending: set[str] = frozenset(), recving: set[str] = frozenset(),
                worker_meta: Any = None) -> None:
        s, r, m = self.due.setdefault(step, (set(), set(), []))
        s |= sending
        r |= recving
        if worker_meta is not None:
            m.append(worker_meta)

    def run(self) -> None:
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
        from vllm.v1.outputs import KVConnectorOutput
        from vllm.v1.request import RequestStatus

        conn, a, pc = self.conn, self.a, time.perf_counter
        t = self.t
        while self.specs or self.waiting or self.remote or self.running or self.due or self.held:
            step = self.steps
            self.steps += 1
            # -- arrivals
            for _ in range(min(a.arrivals_per_step, len(self.specs))):
                if len(self.waiting) >= a.in_flight:
                    break
                req = _request(self.specs.popleft(), self.env)
                t0 = pc()
                conn.on_new_request(req)
                t["new"] += pc() - t0
                self.waiting.append(req)
            # -- schedule: running first (decode 1 token, or the next prefill chunk)
            budget = a.token_budget
            new_reqs, c_ids, c_blocks, c_computed, c_out = [], [], [], [], []
            nsched: dict[str, int] = {}
            for rid, req in self.running.items():
                left = req.num_tokens - req.num_computed_tokens
                n = min(left, budget) if req.num_computed_tokens < req.num_prompt_tokens else 1
                if n <= 0:
                    continue
                budget -= n
                new = self._alloc(rid, req.num_computed_tokens + n)
                nsched[rid] = n
                c_ids.append(rid)
                c_blocks.append((new,) if new else None)
                c_computed.append(req.num_computed_tokens)
                c_out.append(len(req.output_token_ids))
            # loads that arrived: scheduled like vLLM does once finished_recving came back
            for rid in [r for r, q in self.remote.items() if q.status == RequestStatus.WAITING]:
                req = self.remote.pop(rid)
                req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
                n = req.num_tokens - req.num_computed_tokens
                kb = self._kvblocks(rid)
                t0 = pc()
                conn.update_state_after_alloc(req, kb, 0)
                t["alloc"] += pc() - t0
                req.status = RequestStatus.RUNNING
                self.running[rid] = req
                nsched[rid] = n
                budget -= n
                new_reqs.append(NewRequestData.from_request(req, (self._ids(rid),)))
            # admissions
            while self.waiting and budget > 0 and len(self.running) + len(self.remote) < a.in_flight:
                req = self.waiting[0]
                t0 = pc()
                ext, is_async = conn.get_num_new_matched_tokens(req, 0)
                t["lookup"] += pc() - t0
                if ext is None:
                    break
                self.waiting.popleft()
                rid = req.request_id
                ext = min(ext, req.num_tokens)
                self.ext_tokens += ext
                if ext and is_async:
                    self._alloc(rid, req.num_tokens)
                    kb = self._kvblocks(rid)
                    t0 = pc()
                    conn.update_state_after_alloc(req, kb, ext)
                    t["alloc"] += pc() - t0
                    req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
                    req.num_computed_tokens = ext
                    self.remote[rid] = req
                    self._report(step + a.result_delay - 1, recving={rid})
                    continue
                req.num_computed_tokens = min(ext, req.num_tokens - 1)
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                self._alloc(rid, req.num_computed_tokens + n)
                kb = self._kvblocks(rid)
                t0 = pc()
                conn.update_state_after_alloc(req, kb, ext)
                t["alloc"] += pc() - t0
                req.status = RequestStatus.RUNNING
                self.running[rid] = req
                nsched[rid] = n
                budget -= n
                new_reqs.append(NewRequestData.from_request(req, (self._ids(rid),)))
            so = SchedulerOutput(
                scheduled_new_reqs=new_reqs,
                scheduled_cached_reqs=CachedRequestData(
                    req_ids=c_ids, resumed_req_ids=set(), new_token_ids=[], all_token_ids={},
                    new_block_ids=c_blocks, num_computed_tokens=c_computed, num_output_tokens=c_out),
                num_scheduled_tokens=nsched, total_num_scheduled_tokens=sum(nsched.values()),
                scheduled_spec_decode_tokens={}, scheduled_encoder_inputs={},
                finished_req_ids=self.finished_ids, free_encoder_mm_hashes=[],
            )
            self.finished_ids = set()
            t0 = pc()
            meta = conn.build_connector_meta(so)
            t["meta"] += pc() - t0
            echo = worker_echo(meta)
            if echo is not None:
                self._report(step + a.result_delay - 1, worker_meta=echo)
            # The engine drops the step's output (and the connector metadata in it) once the step
            # ran; kept until the next `meta = ...`, it would be freed inside the next timed call.
            del meta, so
            self.request_steps += len(self.running) + len(self.remote) + len(self.held)
            # -- the step ran: advance, finish
            for rid, n in nsched.items():
                req = self.running[rid]
                req.num_computed_tokens += n
                if req.num_computed_tokens >= req.num_tokens:
                    req.append_output_token_ids(7)
                    if len(req.output_token_ids) >= req.max_tokens:
                        self._finish(req)
            # -- worker results of this step
            sending, recving, wmeta = self.due.pop(step, (set(), set(), []))
            for rid in sending:
                self.held.pop(rid, None)
                self._free(rid)
            for rid in recving:
                if rid in self.remote:
                    self.remote[rid].status = RequestStatus.WAITING
            out = KVConnectorOutput(finished_sending=sending or None, finished_recving=recving or None,
                                    kv_connector_worker_meta=_aggregate(wmeta))
            t0 = pc()
            conn.update_connector_output(out)
            # vLLM's scheduler asks every connector for its stats and KV cache events right after
            # (scheduler.update_from_output), every step
            conn.get_kv_connector_stats()
            conn.take_events()
            t["output"] += pc() - t0
            collect_between_steps()
            if self.steps > 100_000:
                raise BenchmarkError(
                    f"benchmark engine did not drain ({type(conn).__name__}: {len(self.specs)} to arrive, "
                    f"{len(self.waiting)} waiting, {len(self.remote)} loading, {len(self.running)} running, "
                    f"{len(self.held)} held, {len(self.due)} results due)"
                )

    def _finish(self, req: Any) -> None:
        from vllm.v1.request import RequestStatus

        rid = req.request_id
        del self.running[rid]
        req.status = RequestStatus.FINISHED_LENGTH_CAPPED
        ids = (self._ids(rid),)
        t0 = time.perf_counter()
        if self.hma:
            delay, _ = self.conn.request_finished_all_groups(req, ids)
        else:
            delay, _ = self.conn.request_finished(req, ids[0])
        self.t["finished"] += time.perf_counter() - t0
        self.finished_ids.add(rid)
        if delay:
            self.deferred += 1
            self.held[rid] = 1
            self._report(self.steps - 1 + self.a.result_delay, sending={rid})
        else:
            self._free(rid)


def collect_between_steps() -> None:
    """The cyclic collector, run where CPython would have run it, but between steps, outside the
    timed calls (automatic collection is off during a run). A collection walks every young object,
    most of them the engine's own (its requests' token lists), and lands in whichever call happens to
    cross the allocation threshold: timed inside a connector call it bills that connector for the
    engine's garbage, milliseconds at a time, at random."""
    c0, c1, c2 = gc.get_count()
    t0, t1, t2 = gc.get_threshold()
    if c0 >= t0:
        gc.collect(2 if c1 >= t1 and c2 >= t2 else 1 if c1 >= t1 else 0)


def worker_echo(meta: Any) -> Any:
    """What the workers of a vLLM connector whose completions travel in worker metadata would
    report once the step's jobs are done (vLLM's OffloadingConnector: completed job ids)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import (
        MultiKVConnectorMetadata,
        MultiKVConnectorWorkerMetadata,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
        OffloadingConnectorMetadata,
        OffloadingWorkerMetadata,
    )

    if isinstance(meta, OffloadingConnectorMetadata):
        jobs = {j: 1 for j in (*meta.load_jobs, *meta.store_jobs)}
        return OffloadingWorkerMetadata(completed_jobs=jobs) if jobs else None
    if isinstance(meta, MultiKVConnectorMetadata):
        parts = tuple(worker_echo(m) for m in meta.metadata)
        return MultiKVConnectorWorkerMetadata(metadata=parts) if any(p is not None for p in parts) else None
    return None


def _aggregate(metas: list) -> Any:
    if not metas:
        return None
    out = metas[0]
    for m in metas[1:]:
        out = out.aggregate(m)
    return out
