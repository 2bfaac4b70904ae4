"""Worker half of the shared tier: registers the rank's KV memory with the store and runs the
loads and stores the scheduler half plans, off the engine thread (:mod:`transfer`).

KV caches in host memory (vLLM's CPU worker) are registered and moved zero-copy; caches elsewhere
(GPU) go through a registered host staging buffer of ``staging_buffer_bytes`` (:mod:`staging`).
``staging="always"`` stages host caches too, ``"never"`` refuses caches it cannot reach.

Reporting, per request:

* a load that verified every block: ``finished_recving``;
* a load that ended early (an object missing, evicted, corrupt) or ran past ``load_timeout_s``:
  ``finished_recving`` with the blocks from the first bad one on in ``invalid_block_ids``; vLLM
  then keeps the good prefix and recomputes the rest (``kv_load_failure_policy=recompute``) or
  fails the request (``fail``). A load never is reported while a get into the engine's blocks
  may still run (vLLM recomputes into the blocks of a failed load, or frees them for another
  request): past its deadline, a load still queued or staged is reported failed at once, a
  zero-copy load whose get is in flight when that get returns (:mod:`transfer`);
* ``finished_sending`` once the request is closed and every job issued for it has returned;
  ``failed_sending`` too when a store of it failed.

Hybrid models (several KV-cache groups): one object holds one block of one group
(:class:`~kvconnect.backends.mooncake.groups.GroupedBlocks`), and a load that ends early fails
the whole request (``failed_recving`` as well): vLLM maps block-level failures back to requests
only for one group, and recomputes a failed request from its start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kvconnect.api import EngineInfo, TransferResults, WorkerConnector
from kvconnect.backends.cpu_offload import groups as G
from kvconnect.backends.mooncake import keys as ks
from kvconnect.backends.mooncake import objects as ob
from kvconnect.backends.mooncake import xxh3
from kvconnect.backends.mooncake.groups import GroupedBlocks
from kvconnect.backends.mooncake.messages import MooncakeHandshake, MooncakeStepMetadata
from kvconnect.backends.mooncake.staging import Staging
from kvconnect.backends.mooncake.stats import WorkerCounters
from kvconnect.backends.mooncake.store import SharedStore, release_store, shared_store
from kvconnect.backends.mooncake.transfer import Job, Lane, StoreIO, merged_ranges, run_job
from kvconnect.config import MooncakeConfig, validate_mooncake
from kvconnect.errors import ConfigError, LayoutError, UnsupportedModelError
from kvconnect.layout import KVLayout
from kvconnect.metadata import decode

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job(Job):
    #: The engine's block ids (``block_ids`` are the I/O's numbers of them: with several
    #: KV-cache groups, :meth:`GroupedBlocks.number`).
    engine_ids: list[int] = field(default_factory=list)


class MooncakeWorker(WorkerConnector):
    supports_hybrid = True

    def __init__(self, config: MooncakeConfig, engine: EngineInfo,
                 store_factory: Callable[[], Any] | None = None) -> None:
        validate_mooncake(config)
        xxh3.require()  # fail at start, not at the first store
        self.cfg = config
        self.engine = engine
        self.rules = G.rules_of(engine, "mooncake")
        self._shared: SharedStore = shared_store(config, store_factory)
        self.io: StoreIO | None = None
        self._grouped: GroupedBlocks | None = None
        self.layout = b""
        self._lanes: dict[str, Lane] = {}
        self._meta: MooncakeStepMetadata | None = None
        self._inflight: dict[str, list[Job]] = {}
        self._closed: set[str] = set()
        self._save_failed: set[str] = set()
        self._out = TransferResults()
        self._counters = WorkerCounters()

    # -- registration ---------------------------------------------------------------------------
    def register_kv_caches(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> None:
        if not caches:
            raise LayoutError("mooncake: register_kv_caches got no layers")
        n_groups = len(self.rules)
        grouped: list[list[tuple[torch.Tensor, KVLayout]]] = [[] for _ in range(n_groups)]
        for name, (t, lay) in caches.items():
            if tuple(t.shape) != lay.shape or tuple(t.stride()) != lay.strides:
                raise LayoutError(
                    f"mooncake: layer {name}: tensor {tuple(t.shape)} does not match its layout"
                )
            if not 0 <= lay.group < n_groups:
                raise LayoutError(
                    f"mooncake: layer {name} is in KV-cache group {lay.group}; the engine has {n_groups}"
                )
            grouped[lay.group].append((t, lay))
        if any(not r for r in grouped):
            raise LayoutError(
                f"mooncake: KV-cache groups {[g for g, r in enumerate(grouped) if not r]} have no layers"
            )
        blocks = self._placement(grouped)
        self.layout = ks.layout_digest(ob.layout_parts(caches))
        ns = ks.namespace(self.cfg, self.engine)
        prefix = ks.rank_prefix(ns, self.layout, self.engine.tp_size, self.engine.tp_rank)
        self.io = StoreIO(self._shared, blocks, prefix, self.layout, self.cfg.batch_objects)
        job = run_job(self.io)
        self._lanes = {k: Lane(f"kvc-mooncake-{k}", job) for k in ("load", "save")}
        logger.info("mooncake: rank %d registered %d blocks of %d bytes (%s; keys %s...)",
                    self.engine.tp_rank, blocks.num_blocks, blocks.payload_bytes,
                    "zero-copy" if self.io.staging is None else
                    f"staged through {self.io.staging.slots} host slots", prefix)

    def _placement(self, grouped: list[list[tuple[torch.Tensor, KVLayout]]]
                   ) -> ob.BlockObjects | GroupedBlocks | Staging:
        """Zero-copy runs of the engine's blocks (per KV-cache group), or a staging buffer; the
        memory the store will name is registered."""
        layers = [c for g in grouped for c in g]
        on_host = all(t.device.type == "cpu" for t, _ in layers)
        mode = self.cfg.staging
        if mode == "never" or (mode == "auto" and on_host):
            if not on_host:
                devs = sorted({str(t.device) for t, _ in layers})
                raise LayoutError(f"mooncake.staging='never': KV caches on {devs} are not host memory "
                                  "and cannot be moved zero-copy; use staging='auto'")
            runs = [[ob.layer_runs(t, lay) for t, lay in g] for g in grouped]
            if len(runs) == 1:
                blocks: ob.BlockObjects | GroupedBlocks = ob.BlockObjects(runs[0])
            else:
                blocks = self._grouped = GroupedBlocks([ob.BlockObjects(r) for r in runs])
            for ptr, size in merged_ranges([(t.data_ptr(), lay.span_bytes) for t, lay in layers]):
                self._shared.register(ptr, size)
            return blocks
        if len(grouped) > 1:
            raise UnsupportedModelError(
                f"mooncake: staged KV (staging={mode!r}, caches on {layers[0][0].device}) serves one "
                f"KV-cache group; this model has {len(grouped)} (hybrid models need host KV caches)"
            )
        payload = sum(n for _, lay in layers for _, n in ob._runs(lay))
        slots = self.cfg.staging_buffer_bytes // payload
        if slots < 4:
            raise ConfigError(
                f"mooncake.staging_buffer_bytes={self.cfg.staging_buffer_bytes} holds {slots} "
                f"object(s) of {payload} bytes (one block, every layer); it needs at least 4 "
                f"({4 * payload} bytes): loads and stores each one batch in flight while the next "
                "is copied"
            )
        staging = Staging(layers, slots)
        self._shared.register(staging.ptr, staging.nbytes)
        return staging

    def get_handshake_metadata(self) -> MooncakeHandshake | None:
        if self.io is None:
            return None
        return MooncakeHandshake(tp_rank=self.engine.tp_rank, layout=self.layout,
                                 object_bytes=self.io.object_bytes)

    # -- per step ---------------------------------------------------------------------------------
    def bind_step_metadata(self, metadata: Any) -> None:
        if isinstance(metadata, (bytes, bytearray, memoryview)):
            metadata = decode(bytes(metadata), MooncakeStepMetadata, what="mooncake step metadata")
        if not isinstance(metadata, MooncakeStepMetadata):
            raise TypeError(f"mooncake: unexpected step metadata {type(metadata).__name__}")
        self._meta = metadata
        self._closed.update(metadata.closed)

    def clear_step_metadata(self) -> None:
        self._meta = None

    def _submit(self, kind: str, request_id: str, block_ids: list[int], keys: list[bytes],
                error: str | None = None, groups: list[int] | None = None) -> None:
        timeout = self.cfg.load_timeout_s if kind == "load" else self.cfg.store_timeout_s
        job = _Job(kind, request_id, list(block_ids), list(keys), time.monotonic() + timeout,
                   engine_ids=list(block_ids))
        if error is None and groups:
            error = self._number(job, groups)
        if error is None and self.io is None:
            error = "KV caches were never registered"
        if error is None and kind == "save" and not self._shared.health.usable():
            error = "store unavailable"
            job.counters.saves_dropped += len(keys)
        if error is None and len(block_ids) != len(keys):
            error = "block and key lists differ in length"
        if error is None and self.io is not None:
            nb = self.io.blocks.num_blocks
            if any(not 0 <= b < nb for b in job.block_ids):
                error = f"block id outside [0, {nb})"
        if error is not None:
            job.error, job.done = error, True
            self._complete(job)
            return
        if self.io is not None and self.io.staging is not None:
            job.marker = self.io.staging.marker()
        self._inflight.setdefault(request_id, []).append(job)
        self._lanes[kind].submit(job)

    def _number(self, job: _Job, groups: list[int]) -> str | None:
        """Turns ``job.block_ids`` (engine ids of ``groups``) into the I/O's numbers; why not."""
        gb = self._grouped
        if gb is None:
            return None if not any(groups) else "KV-cache groups named for a one-group model"
        if len(groups) != len(job.block_ids):
            return "block and group lists differ in length"
        nb = gb.blocks_per_group
        if any(not 0 <= g < len(gb.groups) for g in groups) or any(not 0 <= b < nb for b in job.block_ids):
            return f"a block id outside [0, {nb}) or a group outside [0, {len(gb.groups)})"
        job.block_ids = [gb.number(b, g) for b, g in zip(job.block_ids, groups)]
        return None

    def start_load_kv(self) -> None:
        meta = self._meta
        if meta is None:
            return
        for ld in meta.loads:
            self._submit("load", ld.request_id, ld.block_ids, ld.keys, ld.error, ld.groups)
        for sv in meta.saves:
            self._submit("save", sv.request_id, sv.block_ids, sv.keys, None, sv.groups)

    # -- results ----------------------------------------------------------------------------------
    def _report_load(self, job: Job) -> None:
        job.reported = True
        self._out.finished_recving.add(job.request_id)
        if job.error is not None:
            bad = job.engine_ids[job.good :] if isinstance(job, _Job) else job.block_ids[job.good :]
            self._out.invalid_block_ids.update(bad)
            if self._grouped is not None:
                self._out.failed_recving.add(job.request_id)
            logger.warning("mooncake: load for %s ended after %d of %d blocks: %s", job.request_id,
                           job.good, len(job.block_ids), job.error)
            self._counters.load_failures += 1

    def _complete(self, job: Job) -> None:
        c = self._counters
        c.add(job.counters)
        if job.kind == "load":
            if job.good:
                c.load_blocks += job.good
                c.load_bytes += job.nbytes
                c.load_seconds += job.seconds
            if not job.reported:
                self._report_load(job)
        else:
            c.save_bytes += job.nbytes
            c.save_seconds += job.seconds
            if job.error is not None:
                c.save_failures += 1
                self._save_failed.add(job.request_id)
                logger.info("mooncake: store for %s dropped: %s", job.request_id, job.error)
        lst = self._inflight.get(job.request_id)
        if lst is not None:
            lst[:] = [j for j in lst if j is not job]
            if not lst:
                del self._inflight[job.request_id]

    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults:
        for lane in self._lanes.values():
            while lane.done:
                self._complete(lane.done.popleft())
        now = time.monotonic()
        writes_blocks = self.io is not None and self.io.staging is None
        why = f"no answer within load_timeout_s={self.cfg.load_timeout_s}"
        for jobs in self._inflight.values():
            for job in jobs:
                if job.kind == "load" and not job.reported and now > job.deadline:
                    if job.expire(why, writes_blocks):
                        self._counters.deadline_misses += 1
                        self._report_load(job)
        out, self._out = self._out, TransferResults()
        for rid in list(self._closed):
            if rid not in self._inflight:
                self._closed.discard(rid)
                out.finished_sending.add(rid)
                if rid in self._save_failed:
                    self._save_failed.discard(rid)
                    out.failed_sending.add(rid)
        stats = self._counters.take()
        if stats:
            out.stats = stats
        return out

    def shutdown(self) -> None:
        for lane in self._lanes.values():
            lane.close()
        self._lanes = {}
        if self.io is not None:
            self.io.close()
        release_store(self._shared)
