"""Scheduler half of the shared tier: asynchronous prefix lookups, load and store planning.

The scheduler half runs on the engine's hot path and a store is a network hop away, so a lookup
never waits on it:

* ``get_num_new_matched_tokens`` hashes the request's full blocks (the host tier's
  :class:`~kvconnect.backends.cpu_offload.hashing.KeyCache`) and hands one batched existence
  query (every TP rank's object of every block after ``num_computed_tokens``) to the lookup
  thread, answering ``None`` ("ask again next step"). A later call with the same question reads
  the answer: the longest run of blocks whose objects exist on every rank, stopping before the
  block that holds the last token (the engine computes it for its logits). An answer not in by
  ``lookup_timeout_s`` counts as a miss, and while the store is backing off (a recent call
  failed) lookups miss at once.
* ``update_state_after_alloc`` turns the accepted hit into a :class:`StoreLoad`.
* ``build_step_metadata`` tracks each request's blocks and computed tokens (aborted requests
  store only what was computed).
* ``request_finished`` plans one :class:`StoreSave` of the request's full, computed blocks that
  were not just loaded from the store (the worker skips those the store already holds) and defers
  freeing the blocks (``delay_free=True``) until the workers report the request's jobs returned.

Hybrid models (several KV-cache groups) are not supported, as in the host tier.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvconnect.api import BlockIds, EngineInfo, RequestView, SchedulerConnector, StepView, TransferResults
from kvconnect.backends.cpu_offload.hashing import KeyCache
from kvconnect.backends.cpu_offload.scheduler import known_kv_tokens
from kvconnect.backends.mooncake import keys as ks
from kvconnect.backends.mooncake.messages import MooncakeHandshake, MooncakeStepMetadata, StoreLoad, StoreSave
from kvconnect.backends.mooncake.store import RPC_FAIL, SharedStore, release_store, shared_store
from kvconnect.config import MooncakeConfig, validate_mooncake
from kvconnect.errors import ConfigError, LayoutError
from kvconnect.metadata import as_struct

logger = logging.getLogger(__name__)

#: Lookups kept for requests the engine has not come back for (bounded, oldest dropped).
MAX_LOOKUPS = 16384
#: What every step with nothing for the workers carries (read-only: never mutated).
_EMPTY = MooncakeStepMetadata()


@dataclass(slots=True, eq=False)
class _Lookup:
    num_computed: int
    start: int
    limit: int
    keys: list[bytes]
    t0: float
    #: Blocks found from ``start`` on; None while the query is in flight.
    found: int | None = None


@dataclass(slots=True)
class _Req:
    view: RequestView
    blocks: list[int]
    computed: int = 0
    #: Block range just loaded from the store (known to be there).
    loaded: tuple[int, int] = (0, 0)
    load_blocks: tuple[int, ...] = ()
    had_load: bool = False


def single_group(block_ids: BlockIds, what: str) -> list[int]:
    if len(block_ids) > 1:
        raise LayoutError(
            f"mooncake: {what} has {len(block_ids)} KV-cache groups; this backend supports one "
            "group only (supports_hybrid=False)"
        )
    return list(block_ids[0]) if len(block_ids) else []


def longest_present(flags: list[int], n_blocks: int, n_ranks: int) -> int:
    """Leading blocks whose object exists on every rank; ``flags`` is rank-major."""
    for i in range(n_blocks):
        if any(flags[r * n_blocks + i] != 1 for r in range(n_ranks)):
            return i
    return n_blocks


class MooncakeScheduler(SchedulerConnector):
    supports_hybrid = False
    empty_step_metadata = _EMPTY

    def __init__(self, config: MooncakeConfig, engine: EngineInfo,
                 store_factory: Callable[[], Any] | None = None) -> None:
        validate_mooncake(config)
        self.cfg = config
        self.engine = engine
        self.block_size = engine.block_size
        self._ns = ks.namespace(config, engine)
        self._keys = KeyCache(self._ns, self.block_size)
        self._shared: SharedStore = shared_store(config, store_factory)
        self._layouts: dict[int, bytes] = {}
        self._prefixes: list[str] | None = None
        self._lookups: dict[str, _Lookup] = {}
        self._reqs: dict[str, _Req] = {}
        self._loads: list[StoreLoad] = []
        self._saves: list[StoreSave] = []
        self._closed: list[str] = []
        self._counters = dict.fromkeys(
            ("lookups", "lookup_hits", "lookup_timeouts", "lookups_skipped", "hit_tokens",
             "loads_planned", "saves_planned", "saves_skipped", "save_blocks_planned",
             "loads_invalid"), 0)
        self._worker: dict[str, float] = {}
        self._q: queue.Queue[tuple[_Lookup, list[str]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._lookup_loop, name="kvc-mooncake-lookup", daemon=True)
        self._thread.start()
        self._warned = False

    # -- handshake --------------------------------------------------------------------------------
    def set_handshake_metadata(self, metadata: Mapping[int, Any]) -> None:
        for rank, md in metadata.items():
            md = as_struct(md, MooncakeHandshake, what=f"mooncake handshake (rank {rank})")
            if not 0 <= md.tp_rank < self.engine.tp_size:
                raise ConfigError(f"mooncake: handshake from TP rank {md.tp_rank} of {self.engine.tp_size}")
            self._layouts[md.tp_rank] = md.layout
        self._prefixes = ks.prefixes_by_rank(self._ns, self._layouts, self.engine.tp_size)

    # -- lookups ----------------------------------------------------------------------------------
    def _lookup_loop(self) -> None:
        store, health = self._shared.store, self._shared.health
        while True:
            item = self._q.get()
            if item is None:
                return
            lk, names = item
            if time.monotonic() - lk.t0 > self.cfg.lookup_timeout_s:
                lk.found = 0
                continue
            try:
                flags = list(store.batch_is_exist(names))
            except Exception as e:
                logger.warning("mooncake: batch_is_exist raised %s", e)
                flags = [RPC_FAIL] * len(names)
            if flags and all(f == RPC_FAIL for f in flags):
                health.failed("batch_is_exist could not reach the master")
            n = len(lk.keys)
            lk.found = longest_present(flags, n, len(names) // n if n else 1) if n else 0

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        prefixes = self._prefixes
        if prefixes is None:
            if not self._warned:
                self._warned = True
                logger.warning("mooncake: no worker handshake yet (layout unknown): lookups miss")
            return 0, False
        bs = self.block_size
        n_tokens = len(request.all_token_ids) if request.all_token_ids is not None else request.num_prompt_tokens
        limit = (n_tokens - 1) // bs
        start = num_computed_tokens // bs
        rid = request.request_id
        if limit <= start:
            self._lookups.pop(rid, None)
            return 0, False
        lk = self._lookups.get(rid)
        if lk is not None and lk.start == start and lk.limit == limit and lk.num_computed == num_computed_tokens:
            found = lk.found
            if found is None:
                if time.monotonic() - lk.t0 <= self.cfg.lookup_timeout_s:
                    return None, False
                self._counters["lookup_timeouts"] += 1
                lk.found = found = 0
            return ((start + found) * bs - num_computed_tokens, True) if found else (0, False)
        if not self._shared.health.usable():
            self._counters["lookups_skipped"] += 1
            return 0, False
        keys = self._keys.keys(request, limit)[start:limit]
        if not keys:
            return 0, False
        lk = _Lookup(num_computed_tokens, start, start + len(keys), keys, time.monotonic())
        self._lookups[rid] = lk
        if len(self._lookups) > MAX_LOOKUPS:
            self._lookups.pop(next(iter(self._lookups)))
        self._counters["lookups"] += 1
        self._q.put((lk, [p + k.hex() for p in prefixes for k in keys]))
        return None, False

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        blocks = single_group(block_ids, "update_state_after_alloc")
        st = self._reqs.get(rid)
        if st is None:
            st = self._reqs[rid] = _Req(view=request, blocks=blocks)
        else:
            st.view, st.blocks = request, blocks
        lk = self._lookups.pop(rid, None)
        if num_external_tokens <= 0:
            return
        bs = self.block_size
        if lk is None or not lk.found:
            self._fail_load(rid, blocks, f"engine accepted {num_external_tokens} tokens but no hit is known")
            return
        n_load = -(-(lk.num_computed + num_external_tokens) // bs) - lk.start
        if n_load > lk.found or lk.start + n_load > len(blocks):
            self._fail_load(rid, blocks[lk.start : lk.start + n_load],
                            f"engine accepted {num_external_tokens} tokens; {lk.found} blocks were found "
                            f"and {len(blocks) - lk.start} allocated")
            return
        ids = blocks[lk.start : lk.start + n_load]
        st.loaded, st.load_blocks, st.had_load = (lk.start, lk.start + n_load), tuple(ids), True
        self._loads.append(StoreLoad(request_id=rid, block_ids=ids, keys=lk.keys[:n_load]))
        self._counters["loads_planned"] += 1
        self._counters["lookup_hits"] += 1
        self._counters["hit_tokens"] += num_external_tokens

    def _fail_load(self, rid: str, blocks: list[int], why: str) -> None:
        logger.error("mooncake: request %s: %s; failing its load", rid, why)
        st = self._reqs.get(rid)
        if st is not None:
            st.had_load = True
        self._loads.append(StoreLoad(request_id=rid, block_ids=list(blocks), keys=[], error=why))

    # -- steps and stores -------------------------------------------------------------------------
    def build_step_metadata(self, step: StepView) -> MooncakeStepMetadata:
        for sr in step.scheduled:
            st = self._reqs.get(sr.request_id)
            if st is None:
                continue
            new = single_group(sr.new_block_ids, "a scheduled request")
            if sr.is_new:
                st.blocks = list(new)
            else:
                st.blocks.extend(new)
            st.computed = sr.num_computed_tokens + sr.num_scheduled_tokens
        for rid in step.preempted_request_ids:
            st = self._reqs.get(rid)
            if st is not None:
                st.blocks, st.computed, st.loaded = [], 0, (0, 0)
        if not (self._loads or self._saves or self._closed):
            return _EMPTY
        meta = MooncakeStepMetadata(loads=self._loads, saves=self._saves, closed=self._closed)
        self._loads, self._saves, self._closed = [], [], []
        return meta

    def request_finished(
        self, request: RequestView, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._lookups.pop(rid, None)
        st = self._reqs.pop(rid, None)
        if st is None:
            self._keys.forget(rid)
            return False, None
        st.view = request
        blocks = single_group(block_ids, "request_finished") or st.blocks
        n_full = min(min(st.computed, known_kv_tokens(request)) // self.block_size, len(blocks))
        saved = False
        if n_full > 0 and self._prefixes is not None:
            if not self._shared.health.usable():
                self._counters["saves_skipped"] += 1
            else:
                keys = self._keys.keys(request, n_full)
                lo, hi = st.loaded
                todo = [i for i in range(min(n_full, len(keys))) if not lo <= i < hi]
                if todo:
                    self._saves.append(StoreSave(request_id=rid, block_ids=[blocks[i] for i in todo],
                                                 keys=[keys[i] for i in todo]))
                    self._counters["saves_planned"] += 1
                    self._counters["save_blocks_planned"] += len(todo)
                    saved = True
        self._keys.forget(rid)
        if saved or st.had_load:
            self._closed.append(rid)
            return True, None
        return False, None

    # -- results ----------------------------------------------------------------------------------
    def update_worker_output(self, results: TransferResults) -> None:
        if results.invalid_block_ids:
            for rid in results.finished_recving:
                st = self._reqs.get(rid)
                if st is None or not st.load_blocks:
                    continue
                bad = [i for i, b in enumerate(st.load_blocks) if b in results.invalid_block_ids]
                if bad:
                    # The tail from the first bad block is recomputed: store it again at finish.
                    lo, _ = st.loaded
                    st.loaded = (lo, lo + bad[0])
                    self._counters["loads_invalid"] += 1
        if results.stats:
            for k, v in results.stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._worker[k] = self._worker.get(k, 0) + v

    def get_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters)
        out.update(self._worker)
        out["store_failures"] = self._shared.health.failures
        out["store_usable"] = int(self._shared.health.usable())
        for d in ("load", "save"):
            secs = self._worker.get(f"{d}_seconds", 0.0)
            out[f"{d}_gbps"] = self._worker.get(f"{d}_bytes", 0) / secs / 1e9 if secs > 0 else 0.0
        return out

    def shutdown(self) -> None:
        self._q.put(None)
        self._thread.join(2.0)
        release_store(self._shared)
