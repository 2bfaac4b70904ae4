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

Hybrid models (several KV-cache groups: sliding-window and full attention) are served as in the
host tier: one object per (group, block), and a hit is the longest prefix every group can use
(:mod:`groups`). Models with other kinds of groups (Mamba) are refused at construction
(:class:`~kvconnect.errors.UnsupportedModelError`, which the MultiConnector's
``unsupported_model`` rule reads).

KV cache events (when the engine publishes them; :mod:`kvconnect.events`), with medium
``"STORAGE"``, locality ``"REMOTE"`` and ownership ``"mooncake"`` (vLLM's names for an
offloading tier on storage that is not the instance's own):

* ``BlockStored`` when a store this instance planned ended with every object of the request in
  the store (put by it, or found there already);
* ``BlockRemoved`` for a block this instance published when it learns the object is gone: a
  lookup found it missing, or a load of it failed (the object was missing, failed verification
  and was removed, or did not arrive in time); and for everything it published when the store
  becomes unreachable (nothing it holds can be loaded then; a restarted master holds nothing).

A shared tier cannot know more: objects other instances store, and objects the store evicts, are
not seen by this instance until one of its own lookups or loads meets them. Its events say what
this instance stored and has not seen go; a router that needs the store's whole content must
ask the store.
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
from kvconnect.backends.cpu_offload import groups as G
from kvconnect.backends.cpu_offload.hashing import KeyCache
from kvconnect.backends.cpu_offload.plan import known_kv_tokens, per_group
from kvconnect.backends.mooncake import groups as H
from kvconnect.backends.mooncake import keys as ks
from kvconnect.backends.mooncake.messages import MooncakeHandshake, MooncakeStepMetadata, StoreLoad, StoreSave
from kvconnect.backends.mooncake.stats import SchedulerCounters, WorkerCounters
from kvconnect.backends.mooncake.store import RPC_FAIL, SharedStore, release_store, shared_store
from kvconnect.config import MooncakeConfig, validate_mooncake
from kvconnect.errors import ConfigError
from kvconnect.events import LOCALITY_REMOTE, MEDIUM_STORAGE, TierEvents
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
    #: Hybrid models: each group's keys of blocks ``0 .. limit-1`` (``keys`` is then every
    #: group's keys of blocks ``start .. limit-1``, group after group).
    gkeys: list[list[bytes]] | None = None
    #: Hybrid models: keys whose objects exist on every rank.
    present: set[bytes] | None = None
    #: Keys the query found missing on some rank (only when events are published).
    missing: list[bytes] | None = None
    #: Blocks found from ``start`` on; None while the query is in flight.
    found: int | None = None


@dataclass(slots=True)
class _Req:
    view: RequestView
    #: The request's block ids, per KV-cache group.
    blocks: list[list[int]]
    computed: int = 0
    #: Block range just loaded from the store (known to be there).
    loaded: tuple[int, int] = (0, 0)
    load_blocks: tuple[int, ...] = ()
    load_keys: tuple[bytes, ...] = ()
    had_load: bool = False


def longest_present(flags: list[int], n_blocks: int, n_ranks: int) -> int:
    """Leading blocks whose object exists on every rank; ``flags`` is rank-major."""
    for i in range(n_blocks):
        if any(flags[r * n_blocks + i] != 1 for r in range(n_ranks)):
            return i
    return n_blocks


class MooncakeScheduler(SchedulerConnector):
    supports_hybrid = True
    empty_step_metadata = _EMPTY

    def __init__(self, config: MooncakeConfig, engine: EngineInfo,
                 store_factory: Callable[[], Any] | None = None) -> None:
        validate_mooncake(config)
        self.cfg = config
        self.engine = engine
        self.block_size = engine.block_size
        self.rules = G.rules_of(engine, "mooncake")
        self.n_groups = len(self.rules)
        self._simple = self.n_groups == 1 and self.rules[0].kind == G.FULL
        self._null = engine.null_block_id
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
        self._counters = SchedulerCounters()
        #: What the workers reported, summed (for ``get_stats``).
        self._worker = WorkerCounters()
        #: KV cache events of this tier (only when the engine publishes them).
        self._events = (TierEvents(MEDIUM_STORAGE, self.block_size, LOCALITY_REMOTE, "mooncake")
                        if engine.kv_events else None)
        self._was_usable = True
        #: Keys of each finished request's store, published as stored when it completes.
        self._done_saves: dict[str, list[bytes]] = {}
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
            lk.found = self._answer(lk, flags)

    def _answer(self, lk: _Lookup, flags: list[int]) -> int:
        """Blocks of the hit from ``lk.start`` on, from the flags of ``lk.keys`` on every rank."""
        n = len(lk.keys)
        if not n or len(flags) % n:
            return 0
        ranks = len(flags) // n
        if self._events is not None:
            lk.missing = [
                k for j, k in enumerate(lk.keys) if any(flags[r * n + j] == 0 for r in range(ranks))
            ]
        if lk.gkeys is None:
            return longest_present(flags, n, ranks)
        lk.present = {k for j, k in enumerate(lk.keys) if all(flags[r * n + j] == 1 for r in range(ranks))}
        return H.longest_hit(self.rules, lk.gkeys, lk.present, lk.start, lk.limit, self.block_size)

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
        n_tokens = (
            len(request.all_token_ids) if request.all_token_ids is not None else request.num_prompt_tokens
        )
        limit = (n_tokens - 1) // bs
        start = num_computed_tokens // bs
        rid = request.request_id
        if limit <= start:
            self._lookups.pop(rid, None)
            return 0, False
        lk = self._lookups.get(rid)
        if (
            lk is not None
            and lk.start == start
            and lk.limit == limit
            and lk.num_computed == num_computed_tokens
        ):
            found = lk.found
            if found is None:
                if time.monotonic() - lk.t0 <= self.cfg.lookup_timeout_s:
                    return None, False
                self._counters.lookup_timeouts += 1
                lk.found = found = 0
            if lk.missing:
                assert self._events is not None
                self._events.dropped(lk.missing)
                lk.missing = None
            return ((start + found) * bs - num_computed_tokens, True) if found else (0, False)
        if not self._shared.health.usable():
            self._counters.lookups_skipped += 1
            return 0, False
        if self._simple:
            keys = self._keys.keys(request, limit)[start:limit]
            gkeys = None
            limit = start + len(keys)
        else:
            gkeys = [list(self._keys.group_keys(request, limit, g)) for g in range(self.n_groups)]
            limit = min(limit, min(map(len, gkeys)))
            keys = [k for gk in gkeys for k in gk[start:limit]]
        if not keys:
            return 0, False
        lk = _Lookup(num_computed_tokens, start, limit, keys, time.monotonic(), gkeys)
        self._lookups[rid] = lk
        if len(self._lookups) > MAX_LOOKUPS:
            self._lookups.pop(next(iter(self._lookups)))
        self._counters.lookups += 1
        self._q.put((lk, [p + k.hex() for p in prefixes for k in keys]))
        return None, False

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        rid = request.request_id
        blocks = per_group(block_ids, self.n_groups, "update_state_after_alloc", "mooncake")
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
            self._fail_load(rid, self._real(blocks, 0, max(map(len, blocks), default=0)),
                            f"engine accepted {num_external_tokens} tokens but no hit is known")
            return
        end = -(-(lk.num_computed + num_external_tokens) // bs)
        n_load = end - lk.start
        got: tuple[list[int], list[bytes], list[int]] | None = None
        if n_load <= lk.found:
            if lk.gkeys is None:
                if end <= len(blocks[0]):
                    got = blocks[0][lk.start : end], lk.keys[:n_load], []
            else:
                assert lk.present is not None
                got = H.load_entries(self.rules, lk.gkeys, lk.present, blocks, lk.start, end, bs, self._null)
        if got is None:
            self._fail_load(rid, self._real(blocks, lk.start, end),
                            f"engine accepted {num_external_tokens} tokens; {lk.found} blocks were found "
                            f"and {min(map(len, blocks)) - lk.start} allocated")
            return
        ids, keys, groups = got
        st.loaded, st.load_blocks, st.had_load = (lk.start, end), tuple(ids), True
        st.load_keys = tuple(keys)
        self._loads.append(StoreLoad(request_id=rid, block_ids=ids, keys=keys, groups=groups))
        self._counters.loads_planned += 1
        self._counters.lookup_hits += 1
        self._counters.hit_tokens += num_external_tokens

    def _real(self, blocks: list[list[int]], lo: int, hi: int) -> list[int]:
        return [b for ids in blocks for b in ids[lo:hi] if b != self._null]

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
            ids = sr.new_block_ids  # () when the engine added no block (most steps)
            if ids or sr.is_new:
                new = per_group(ids, self.n_groups, "a scheduled request", "mooncake")
                if sr.is_new:
                    st.blocks = new
                else:
                    for have, more in zip(st.blocks, new):
                        have.extend(more)
            st.computed = sr.num_computed_tokens + sr.num_scheduled_tokens
        for rid in step.preempted_request_ids:
            st = self._reqs.get(rid)
            if st is not None:
                st.blocks, st.computed, st.loaded = [[] for _ in range(self.n_groups)], 0, (0, 0)
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
        blocks = per_group(block_ids, self.n_groups, "request_finished", "mooncake")
        if not any(blocks):
            blocks = st.blocks
        n_full = min(min(st.computed, known_kv_tokens(request)) // self.block_size, min(map(len, blocks)))
        saved = False
        if n_full > 0 and self._prefixes is not None:
            if not self._shared.health.usable():
                self._counters.saves_skipped += 1
            else:
                saved = self._plan_save(st, blocks, n_full)
        self._keys.forget(rid)
        if saved or st.had_load:
            self._closed.append(rid)
            return True, None
        return False, None

    def _plan_save(self, st: _Req, blocks: list[list[int]], n_full: int) -> bool:
        """One :class:`StoreSave` of the request's full blocks not just loaded; False when none."""
        view = st.view
        if self._simple:
            keys = self._keys.keys(view, n_full)
            lo, hi = st.loaded
            todo = [(0, i, blocks[0][i], keys[i]) for i in range(min(n_full, len(keys))) if not lo <= i < hi]
        else:
            # Sliding-window blocks before the window at the computed count may be gone (and reused).
            todo = H.save_entries(self.rules, lambda g, n: self._keys.group_keys(view, n, g), blocks,
                                  n_full, st.loaded, st.computed, self.block_size, self._null)
        if not todo:
            return False
        keys = [t[3] for t in todo]
        self._saves.append(StoreSave(request_id=view.request_id, block_ids=[t[2] for t in todo], keys=keys,
                                     groups=[t[0] for t in todo] if not self._simple else []))
        self._counters.saves_planned += 1
        self._counters.save_blocks_planned += len(todo)
        if self._events is not None:
            ev = self._events
            new = [t for t in todo if not ev.holds(t[3])]  # published already: not again
            for g in range(self.n_groups):
                part = [t for t in new if t[0] == g]
                if part:
                    ev.planned(view, [t[1] for t in part], [t[3] for t in part], group=g)
            if new:
                self._done_saves[view.request_id] = [t[3] for t in new]
        return True

    # -- results ----------------------------------------------------------------------------------
    def update_worker_output(self, results: TransferResults) -> None:
        if results.invalid_block_ids or results.failed_recving:
            for rid in results.finished_recving:
                st = self._reqs.get(rid)
                if st is None or not st.load_blocks:
                    continue
                if rid in results.failed_recving:
                    first_bad = 0  # the whole load is recomputed (hybrid models)
                else:
                    bad = [i for i, b in enumerate(st.load_blocks) if b in results.invalid_block_ids]
                    if not bad:
                        continue
                    first_bad = bad[0]
                # The tail from the first bad block is recomputed: store it again at finish.
                lo, _ = st.loaded
                st.loaded = (lo, lo + first_bad if self._simple else lo)
                self._counters.loads_invalid += 1
                if self._events is not None and self._simple and first_bad < len(st.load_keys):
                    # Its first bad object is gone (missing, or removed when it failed
                    # verification) or did not arrive in time; the store at finish republishes it
                    # if it is still there. (A hybrid load fails whole: which object failed is
                    # not known here; the next lookup finds it.)
                    self._events.dropped([st.load_keys[first_bad]])
        if self._events is not None and results.finished_sending:
            self._saves_done(results)
        if results.stats:
            self._worker.add_reported(results.stats)

    def _saves_done(self, results: TransferResults) -> None:
        assert self._events is not None
        for rid in results.finished_sending:
            keys = self._done_saves.pop(rid, None)
            if keys is None:
                continue
            if rid in results.failed_sending:
                self._events.dropped(keys)  # planned, never published: nothing to withdraw
            else:
                self._events.ready(keys)

    def take_events(self) -> list[Any]:
        ev = self._events
        if ev is None:
            return []
        usable = self._shared.health.usable()
        if self._was_usable and not usable:
            ev.cleared()
        self._was_usable = usable
        return ev.take()

    def get_stats(self) -> dict[str, Any]:
        w = self._worker
        out: dict[str, Any] = self._counters.as_dict() | w.as_dict()
        out["store_failures"] = self._shared.health.failures
        out["store_usable"] = int(self._shared.health.usable())
        out["load_gbps"] = w.load_bytes / w.load_seconds / 1e9 if w.load_seconds > 0 else 0.0
        out["save_gbps"] = w.save_bytes / w.save_seconds / 1e9 if w.save_seconds > 0 else 0.0
        return out

    def shutdown(self) -> None:
        self._q.put(None)
        self._thread.join(2.0)
        release_store(self._shared)
