"""Scheduler half of the CPU offload tier: prefix lookups, slot planning, store/load jobs.

Per request, in the engine's call order:

* ``get_num_new_matched_tokens`` hashes the request's full blocks (once; memoised), finds the
  longest run of stored blocks after ``num_computed_tokens`` and pins those slots. Repeated calls
  replace the previous pins, so the call is idempotent. It never offers the whole request: the
  last token always stays for the engine to compute (it needs logits), so the hit stops at the
  last full block that ends before the final token. (vLLM's own offloading connector may offer
  every full block and relies on its scheduler recomputing the final token; kvconnect also serves
  engines that do not, so it backs off by whole blocks here.)
* ``update_state_after_alloc`` turns the pinned hit into a :class:`LoadJob` (or releases the pins
  when the engine took zero tokens from us).
* ``build_step_metadata`` tracks block lists and computed tokens from the step; with
  ``store_mode="fill"`` it plans stores of blocks that fill during the step.
* ``request_finished`` plans stores of the request's full, computed blocks not yet stored and
  returns ``delay_free=True`` while any of its copies is outstanding.
* ``update_worker_output`` unpins finished loads (dropping the slots of failed ones) and commits
  or frees the slots of finished stores.

Slots of a store become hits only when the request's stores are reported complete by every
worker (``finished_sending``); until then they are pending and never offered.

Hybrid models (several KV-cache groups: sliding-window and full attention) are supported: a slot
holds one engine block of one group under a per-group key, and a hit is the longest prefix every
group can use. What a hit means for a sliding-window group, and why, is in :mod:`groups`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kvconnect.api import BlockIds, EngineInfo, RequestView, SchedulerConnector, StepView, TransferResults
from kvconnect.backends.cpu_offload import groups as G
from kvconnect.backends.cpu_offload import sizing
from kvconnect.backends.cpu_offload.hashing import KeyCache
from kvconnect.backends.cpu_offload.index import SlotIndex
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadHandshake, OffloadStepMetadata, StoreJob
from kvconnect.backends.cpu_offload.plan import Lookup, ReqState, known_kv_tokens, load_entries, per_group
from kvconnect.backends.cpu_offload.policies import make_policy
from kvconnect.backends.cpu_offload.stats import SchedulerCounters
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError
from kvconnect.events import MEDIUM_CPU, TierEvents
from kvconnect.metadata import as_struct

logger = logging.getLogger(__name__)


class CpuOffloadScheduler(SchedulerConnector):
    supports_hybrid = True
    hit_source = "host"

    def __init__(self, config: CpuOffloadConfig, engine: EngineInfo) -> None:
        sizing.validate(config)
        self.cfg = config
        self.engine = engine
        self.block_size = engine.block_size
        self.rules = G.rules_of(engine)
        self.n_groups = len(self.rules)
        self._simple = self.n_groups == 1 and self.rules[0].kind == G.FULL
        self._null = engine.null_block_id
        self._keys = KeyCache(config.hash_salt, self.block_size)
        self.index: SlotIndex | None = None
        self._reqs: dict[str, ReqState] = {}
        self._lookups: dict[str, Lookup] = {}
        self._loads: list[LoadJob] = []
        self._stores: list[StoreJob] = []
        self._closed: list[str] = []
        self._counters = SchedulerCounters()
        self._worker: dict[str, Any] = {}
        #: KV cache events of this tier (only when the engine publishes them).
        self._events = TierEvents(MEDIUM_CPU, self.block_size) if engine.kv_events else None
        self._block_bytes = 0
        self._warned_unsized = False
        hint = sizing.slot_hint(engine)
        if hint is not None:
            self._size(int(hint), "EngineInfo")

    # -- sizing -----------------------------------------------------------------------------------
    def _size(self, kv_bytes_per_block: int, source: str) -> None:
        n = sizing.slot_count(self.cfg, self.engine.tp_size, kv_bytes_per_block)
        if self.index is None:
            self.index = SlotIndex(n, make_policy(self.cfg.eviction_policy, n), self._events)
            self._block_bytes = kv_bytes_per_block
            logger.info("cpu_offload: %d host slots of %d bytes (from %s)", n, kv_bytes_per_block, source)
        elif self.index.num_slots != n:
            raise ConfigError(
                f"cpu_offload: {source} gives {n} slots ({kv_bytes_per_block} bytes per block) but "
                f"the scheduler already sized its pool to {self.index.num_slots} slots"
            )

    def set_handshake_metadata(self, metadata: Mapping[int, Any]) -> None:
        hs: dict[int, OffloadHandshake] = {}
        for rank, md in metadata.items():
            hs[rank] = as_struct(md, OffloadHandshake, what=f"cpu_offload handshake (rank {rank})")
        if not hs:
            return
        sizes = {(h.kv_bytes_per_block, h.num_slots) for h in hs.values()}
        if len(sizes) > 1:
            raise ConfigError(f"cpu_offload: TP ranks disagree on block bytes / slot count: {sorted(sizes)}")
        kv_bytes, num_slots = sizes.pop()
        self._size(kv_bytes, "worker handshake")
        assert self.index is not None
        if self.index.num_slots != num_slots:
            raise ConfigError(
                f"cpu_offload: workers allocated {num_slots} slots, the scheduler computed "
                f"{self.index.num_slots}"
            )

    def _unsized(self) -> bool:
        if self.index is None and not self._warned_unsized:
            self._warned_unsized = True
            logger.warning(
                "cpu_offload: block size in bytes not known yet (no model_signature[%r] and no "
                "worker handshake): no hits and no stores until it is",
                sizing.KV_BYTES_PER_BLOCK,
            )
        return self.index is None

    # -- lookups and loads ----------------------------------------------------------------------------
    def _release_lookup(self, request_id: str) -> None:
        lk = self._lookups.pop(request_id, None)
        if lk is not None and self.index is not None:
            self.index.unpin(lk.slots)

    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        rid = request.request_id
        self._release_lookup(rid)
        if self._unsized():
            return 0, False
        assert self.index is not None
        bs = self.block_size
        n_tokens = (
            len(request.all_token_ids) if request.all_token_ids is not None else request.num_prompt_tokens
        )
        limit = (n_tokens - 1) // bs  # whole blocks that end before the last token
        start = num_computed_tokens // bs
        if limit <= start:
            return 0, False
        if self._simple:  # one full-attention group: the common case, without the walk
            keys = self._keys.keys(request, limit)
            slots = self.index.ready_prefix(keys, start, limit)
            end = start + len(slots)
            lk = Lookup(num_computed_tokens, start, end, slots, keys[start:end])
        else:
            end, entries = G.longest_hit(
                self.index, lambda g, n: self._keys.group_keys(request, n, g), self.rules, start, limit, bs
            )
            lk = Lookup(num_computed_tokens, start, end, [e[2] for e in entries], [e[3] for e in entries],
                         [(e[0], e[1]) for e in entries])
        if end <= start:
            return 0, False
        self.index.pin(lk.slots)
        self._lookups[rid] = lk
        return end * bs - num_computed_tokens, True

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        blocks = per_group(block_ids, self.n_groups, "update_state_after_alloc")
        st = self._reqs.get(rid)
        if st is None:
            st = self._reqs[rid] = ReqState(view=request, blocks=blocks, planned=[0] * self.n_groups)
        else:
            st.view, st.blocks = request, blocks
        lk = self._lookups.pop(rid, None)
        if num_external_tokens <= 0:
            if lk is not None and self.index is not None:
                self.index.unpin(lk.slots)
            self._counters.misses += 1
            return
        if lk is None or self.index is None:
            self._fail_load(st, self._real(blocks, 0, len(blocks[0])),
                            f"engine accepted {num_external_tokens} tokens but no hit is pinned")
            return
        bs = self.block_size
        end = -(-(lk.num_computed + num_external_tokens) // bs)
        take = load_entries(lk, end, blocks, self.rules, bs, self._null)
        if take is None:
            self.index.unpin(lk.slots)
            self._fail_load(
                st, self._real(blocks, lk.start, end),
                f"engine accepted {num_external_tokens} tokens (blocks {lk.start}..{end - 1}); "
                f"blocks {lk.start}..{lk.end - 1} are pinned and {min(map(len, blocks))} allocated",
            )
            return
        js, block_list, groups = take
        if len(js) < len(lk.slots):
            kept = set(js)
            self.index.unpin([s for j, s in enumerate(lk.slots) if j not in kept])
        slots = [lk.slots[j] for j in js]
        keys = [lk.keys[j] for j in js]
        self.index.touch(slots)
        st.load_slots, st.load_keys = slots, keys
        st.load_tokens = (end - lk.start) * bs
        st.planned = [max(p, end) for p in st.planned]
        self._loads.append(
            LoadJob(request_id=rid, block_ids=block_list, slots=slots, keys=keys, groups=groups)
        )
        self._counters.hits += 1
        self._counters.hit_tokens += num_external_tokens

    def _real(self, blocks: list[list[int]], lo: int, hi: int) -> list[int]:
        return [b for ids in blocks for b in ids[lo:hi] if b != self._null]

    def _fail_load(self, st: ReqState, blocks: list[int], why: str) -> None:
        logger.error("cpu_offload: request %s: %s; failing its load", st.view.request_id, why)
        st.load_slots, st.load_keys = [], []
        self._loads.append(
            LoadJob(request_id=st.view.request_id, block_ids=blocks, slots=[], keys=[], error=why)
        )

    # -- stores ---------------------------------------------------------------------------------------
    def _plan_store(
        self, st: ReqState, blocks: list[list[int]], after_forward: bool, alive_tokens: int
    ) -> None:
        """Plan stores of the full, computed blocks not yet planned. ``alive_tokens``: the engine
        still holds every sliding-window block inside the window at that many computed tokens."""
        if self.index is None or not blocks:
            return
        bs = self.block_size
        n_full = min(min(st.computed, known_kv_tokens(st.view)) // bs, min(map(len, blocks)))
        if n_full <= min(st.planned):
            return
        todo: list[tuple[int, int, int, bytes]] = []  # (group, block index, block id, key)
        for g, rule in enumerate(self.rules):
            lo = max(st.planned[g], rule.first_alive(alive_tokens, bs))
            if lo >= n_full:
                continue
            keys = self._keys.group_keys(st.view, n_full, g)
            for i in range(lo, min(n_full, len(keys))):
                b = blocks[g][i]
                if b != self._null and keys[i] not in self.index:
                    todo.append((g, i, b, keys[i]))
        slots = self.index.reserve([t[3] for t in todo])
        st.planned = [max(p, n_full) for p in st.planned]
        if len(slots) < len(todo):
            self._counters.skipped_stores += len(todo) - len(slots)
            for g, i, _, _ in todo[len(slots):]:
                st.planned[g] = min(st.planned[g], i)
        if not slots:
            return
        done = todo[: len(slots)]
        job_keys = [t[3] for t in done]
        st.store_slots.extend(slots)
        st.store_keys.extend(job_keys)
        if self._events is not None:
            for g in range(self.n_groups):
                part = [t for t in done if t[0] == g]
                if part:
                    self._events.planned(st.view, [t[1] for t in part], [t[3] for t in part], group=g)
        self._stores.append(
            StoreJob(
                request_id=st.view.request_id, block_ids=[t[2] for t in done], slots=slots,
                keys=job_keys, after_forward=after_forward,
                groups=[t[0] for t in done] if self.n_groups > 1 else [],
            )
        )

    def build_step_metadata(self, step: StepView) -> OffloadStepMetadata:
        fill = self.cfg.store_mode == "fill"
        for sr in step.scheduled:
            st = self._reqs.get(sr.request_id)
            if st is None or st.finished:
                continue
            ids = sr.new_block_ids  # () when the engine added no block (most steps)
            if not ids and not sr.is_new:
                pass
            elif self.n_groups == 1 and len(ids) == 1:  # every step of every request: kept lean
                if sr.is_new:
                    st.blocks = [list(ids[0])]
                else:
                    st.blocks[0].extend(ids[0])
            else:
                new = per_group(ids, self.n_groups, "a scheduled request")
                if sr.is_new:
                    st.blocks = new
                else:
                    for have, more in zip(st.blocks, new):
                        have.extend(more)
            st.computed = sr.num_computed_tokens + sr.num_scheduled_tokens
            if fill:
                # The engine freed sliding-window blocks outside the window at the computed count
                # it allocated this step for; later ones live until the next step.
                self._plan_store(st, st.blocks, after_forward=True, alive_tokens=sr.num_computed_tokens)
        preempted = []
        for rid in step.preempted_request_ids:
            st = self._reqs.get(rid)
            if st is not None:
                st.blocks, st.computed = [[] for _ in range(self.n_groups)], 0
            preempted.append(rid)
        meta = OffloadStepMetadata(
            loads=self._loads, stores=self._stores, preempted=preempted, closed=self._closed
        )
        self._loads, self._stores, self._closed = [], [], []
        return meta

    def request_finished(
        self, request: RequestView, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._release_lookup(rid)
        st = self._reqs.get(rid)
        if st is None or st.finished:
            self._keys.forget(rid)
            return False, None
        st.view = request
        blocks = per_group(block_ids, self.n_groups, "request_finished")
        if not any(blocks):
            blocks = st.blocks
        # Sliding-window blocks before the window at the computed count may be gone (and reused).
        self._plan_store(st, blocks, after_forward=False, alive_tokens=st.computed)
        self._keys.forget(rid)
        if st.store_slots or st.load_slots is not None:
            st.finished = True
            self._closed.append(rid)
            return True, None
        del self._reqs[rid]
        return False, None

    # -- results --------------------------------------------------------------------------------------
    def _end_load(self, st: ReqState, failed: bool) -> None:
        slots, keys = st.load_slots or [], st.load_keys
        st.load_slots, st.load_keys = None, []
        if self.index is None:
            return
        self.index.unpin(slots)
        if failed:
            self.index.discard(slots, keys)
            self._counters.load_failures += 1
        else:
            self._counters.loaded_tokens += st.load_tokens

    def update_worker_output(self, results: TransferResults) -> None:
        failed_sending = results.failed_sending
        for rid in results.finished_recving:
            st = self._reqs.get(rid)
            if st is not None and st.load_slots is not None:
                self._end_load(st, rid in results.failed_recving)
        for rid in results.finished_sending:
            st = self._reqs.get(rid)
            if st is None or not st.finished:
                continue
            if st.load_slots is not None:
                self._end_load(st, rid in results.failed_recving)
            if self.index is not None and st.store_slots:
                if rid in failed_sending:
                    self.index.discard(st.store_slots, st.store_keys)
                    self._counters.store_failures += 1
                else:
                    self.index.commit(st.store_slots, st.store_keys)
                    self._counters.stored_blocks += len(st.store_slots)
                    self._counters.stored_tokens += len(st.store_slots) * self.block_size
            del self._reqs[rid]
        if results.stats:
            for k, v in results.stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._worker[k] = self._worker.get(k, 0) + v

    def get_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self._counters.as_dict()
        idx = self.index
        out["evictions"] = idx.evictions if idx else 0
        out["num_slots"] = idx.num_slots if idx else 0
        out["stored_now"] = idx.num_stored if idx else 0
        out.update(self._worker)
        for d in ("load", "store"):
            secs = self._worker.get(f"{d}_seconds", 0.0)
            out[f"{d}_gbps"] = self._worker.get(f"{d}_bytes", 0) / secs / 1e9 if secs > 0 else 0.0
        return out

    def take_events(self) -> list[Any]:
        return self._events.take() if self._events is not None else []

    def get_gauges(self) -> dict[str, Any]:
        idx = self.index
        held = idx.num_stored if idx is not None else 0
        return {"held_blocks": held, "held_bytes": held * self._block_bytes * self.engine.tp_size,
                "capacity_blocks": idx.num_slots if idx is not None else 0}

    def shutdown(self) -> None:
        for rid in list(self._lookups):
            self._release_lookup(rid)
