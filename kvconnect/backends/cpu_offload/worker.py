"""Worker half of the CPU offload tier: the host pool and the copies.

At registration the worker measures one block's bytes over its layers, allocates
``[num_slots, *block_shape]`` per layer (pinned when the KV caches are on a GPU) and publishes
:class:`OffloadHandshake` so the scheduler half can check it sized its index the same way.

Hybrid models: a slot holds one block of one KV-cache group. vLLM's hybrid allocator gives every
group the same number of layers with the same block shape (its groups share KV tensors by
position), so the pools are per layer *position*: layer ``p`` of every group uses pool ``p``, and a
slot costs one group's block bytes. Groups that do not line up are refused at registration.

Per step: loads and finished-request stores are started in ``start_load_kv`` (they touch no block
of this step's forward pass); stores of blocks filled by this step start in ``wait_for_save``.
Every copy runs off the engine thread (:mod:`copier`), in submission order.

The worker keeps the key each slot actually holds. A load names the key it expects per slot; a
slot holding anything else (evicted and overwritten meanwhile) fails that request's load before
a byte is copied: the request is reported received *and* failed, with its block ids invalid. With
``verify_checksums`` each slot's Adler-32 is recorded at store and checked at load.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from kvconnect.api import EngineInfo, TransferResults, WorkerConnector
from kvconnect.backends.cpu_offload import sizing
from kvconnect.backends.cpu_offload.copier import (
    CopyHelpers,
    CopyTask,
    CudaStreamCopier,
    LayerCopy,
    ThreadCopier,
    build_layers,
    copy_blocks,
    slot_checksum,
)
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadHandshake, OffloadStepMetadata, StoreJob
from kvconnect.backends.cpu_offload.rows import block_shape
from kvconnect.backends.cpu_offload.stats import LoadCheck, WorkerCounters
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError, LayoutError
from kvconnect.layout import KVLayout
from kvconnect.metadata import decode
from kvconnect.telemetry import record_transfer

logger = logging.getLogger(__name__)

#: How long ``start_load_kv`` waits for the copies of a preempted request (whose blocks this
#: step's forward pass may reuse) before giving up on them (their stores then count as failed).
PREEMPT_WAIT_S = 30.0


class CpuOffloadWorker(WorkerConnector):
    supports_hybrid = True

    def __init__(self, config: CpuOffloadConfig, engine: EngineInfo) -> None:
        sizing.validate(config)
        self.cfg = config
        self.engine = engine
        self.num_slots = 0
        self.kv_bytes_per_block = 0
        self.layers: list[LayerCopy] = []
        #: Layers of each KV-cache group, in position order (``layers`` is group 0's).
        self.group_layers: list[list[LayerCopy]] = []
        self._copier: ThreadCopier | CudaStreamCopier | None = None
        self._helpers: CopyHelpers | None = None
        self._slot_keys: list[bytes | None] = []
        self._slot_sums: list[int | None] = []
        self._meta: OffloadStepMetadata | None = None
        self._deferred: list[StoreJob] = []
        self._inflight: dict[str, list[CopyTask]] = {}
        self._closed: set[str] = set()
        self._store_failed: set[str] = set()
        self._out = TransferResults()
        self._counters = WorkerCounters()
        #: The ``transfers`` section of the next report (:func:`kvconnect.telemetry.record_transfer`).
        self._transfers: dict[str, Any] = {}

    # -- registration ---------------------------------------------------------------------------------
    def register_kv_caches(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> None:
        if not caches:
            raise LayoutError("cpu_offload: register_kv_caches got no layers")
        by_group = self._by_group(caches)
        total = 0
        for name, (t, lay) in caches.items():
            if tuple(t.shape) != lay.shape or tuple(t.stride()) != lay.strides:
                raise LayoutError(
                    f"cpu_offload: layer {name}: tensor {tuple(t.shape)} does not match its layout"
                )
            if lay.block_size != self.engine.block_size:
                raise LayoutError(
                    f"cpu_offload: layer {name} has {lay.block_size}-token blocks, the engine "
                    f"{self.engine.block_size}"
                )
            total += lay.block_bytes
        hint = sizing.engine_hint(self.engine)
        if hint is not None and int(hint) != total:
            raise ConfigError(
                f"cpu_offload: the engine says {hint} bytes per KV block but this rank's "
                f"layers hold {total} bytes per block"
            )
        total //= len(by_group)  # one slot: one block of one group
        self.kv_bytes_per_block = total
        self.num_slots = sizing.slot_count(self.cfg, self.engine.tp_size, total)
        devices = {t.device for t, _ in caches.values()}
        if len(devices) > 1:
            raise LayoutError(f"cpu_offload: KV caches live on several devices {devices}")
        device = devices.pop()
        on_gpu = device.type == "cuda"
        group_caches = [{name: (t, lay) for name, t, lay in members} for members in by_group]
        first = build_layers(group_caches[0], self.num_slots, pin_memory=on_gpu)
        # a slot holds one block of one group: every group copies through group 0's pools
        self.group_layers = [first] + [
            build_layers(gc, self.num_slots, pin_memory=on_gpu, share_pools_with=first)
            for gc in group_caches[1:]
        ]
        self.layers = first
        self._slot_keys = [None] * self.num_slots
        self._slot_sums = [None] * self.num_slots
        if on_gpu:
            self._copier = CudaStreamCopier(device, self._start_task, self._finish_task)
        else:
            if self.cfg.copy_threads > 1:
                self._helpers = CopyHelpers(self.cfg.copy_threads - 1)
            self._copier = ThreadCopier(self._run_task)
        logger.info("cpu_offload: %d slots x %d bytes on the host (%s KV caches)",
                    self.num_slots, total, device.type)

    def _by_group(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> list[list[tuple]]:
        """``(name, tensor, layout)`` of each group's layers in registration order; a LayoutError
        when the groups are not those the engine announced or their layers do not line up."""
        n = max(len(self.engine.block_sizes), 1)
        members: list[list[tuple]] = [[] for _ in range(n)]
        for name, (t, lay) in caches.items():
            if not 0 <= lay.group < n:
                raise LayoutError(
                    f"cpu_offload: layer {name} is in KV-cache group {lay.group}; the engine has {n}"
                )
            members[lay.group].append((name, t, lay))
        first = members[0]
        for g, row in enumerate(members):
            if len(row) != len(first):
                raise LayoutError(
                    f"cpu_offload: KV-cache group {g} has {len(row)} layers, group 0 has {len(first)}; "
                    "a slot holds one block of one group, so every group needs the same layers"
                )
            for (n0, t0, l0), (name, t, lay) in zip(first, row):
                if block_shape(lay) != block_shape(l0) or t.dtype != t0.dtype:
                    raise LayoutError(
                        f"cpu_offload: layer {name} (group {g}) has blocks {block_shape(lay)} {t.dtype}, "
                        f"its counterpart {n0} in group 0 {block_shape(l0)} {t0.dtype}"
                    )
        return members

    def get_handshake_metadata(self) -> OffloadHandshake | None:
        if not self.num_slots:
            return None
        return OffloadHandshake(
            tp_rank=self.engine.tp_rank, kv_bytes_per_block=self.kv_bytes_per_block, num_slots=self.num_slots
        )

    # -- tasks (run on the copier) --------------------------------------------------------------------
    def _check_ids(self, task: CopyTask) -> str | None:
        nb = self.layers[0].engine.shape[self.layers[0].block_dim]
        if len(task.block_ids) != len(task.slots) or len(task.slots) != len(task.keys):
            return "block, slot and key lists differ in length"
        if task.groups and (len(task.groups) != len(task.slots)
                            or any(not 0 <= g < len(self.group_layers) for g in task.groups)):
            return (
                f"group list does not match the blocks or names a group outside [0, {len(self.group_layers)})"
            )
        if any(not 0 <= b < nb for b in task.block_ids):
            return f"block id outside [0, {nb})"
        if any(not 0 <= s < self.num_slots for s in task.slots):
            return f"slot outside [0, {self.num_slots})"
        return None

    def _start_task(self, task: CopyTask) -> None:
        """Checks and bookkeeping before the copy, then the copy (enqueued on a GPU)."""
        if task.error is None:
            task.error = self._check_ids(task)
        if task.error is not None:
            return
        if task.kind == "load":
            for s, k in zip(task.slots, task.keys):
                if self._slot_keys[s] != k:
                    task.error = f"slot {s} no longer holds the expected block (evicted or overwritten)"
                    task.failed_check = LoadCheck.KEY_MISMATCH
                    return
            if self.cfg.verify_checksums:
                for s in task.slots:
                    if self._slot_sums[s] is None or slot_checksum(self.layers, s) != self._slot_sums[s]:
                        task.error = f"slot {s} failed its checksum"
                        task.failed_check = LoadCheck.CHECKSUM
                        return
        else:
            for s in task.slots:
                self._slot_keys[s] = None
                self._slot_sums[s] = None
        dma = getattr(self._copier, "dma_stream", None)
        if not task.groups:
            copy_blocks(self.layers, task.kind, task.block_ids, task.slots, task.keep, self._helpers, dma)
            return
        for g in sorted(set(task.groups)):
            ix = [j for j, gj in enumerate(task.groups) if gj == g]
            copy_blocks(self.group_layers[g], task.kind, [task.block_ids[j] for j in ix],
                        [task.slots[j] for j in ix], task.keep, self._helpers, dma)

    def _finish_task(self, task: CopyTask) -> None:
        """Bookkeeping once the copy is complete: a store's slots now hold its keys."""
        if task.kind != "store" or task.error is not None:
            return
        if task.cancelled:
            task.error = "store abandoned: its request was preempted and the copy did not finish in time"
            return
        for s, k in zip(task.slots, task.keys):
            self._slot_keys[s] = k
            if self.cfg.verify_checksums:
                self._slot_sums[s] = slot_checksum(self.layers, s)

    def _run_task(self, task: CopyTask) -> None:
        try:
            self._start_task(task)
        except Exception:
            if task.kind == "store":
                for s in task.slots:
                    if 0 <= s < self.num_slots:
                        self._slot_keys[s] = None
            raise
        self._finish_task(task)

    # -- per step -------------------------------------------------------------------------------------
    def bind_step_metadata(self, metadata: Any) -> None:
        if isinstance(metadata, (bytes, bytearray, memoryview)):
            metadata = decode(bytes(metadata), OffloadStepMetadata, what="cpu_offload step metadata")
        if not isinstance(metadata, OffloadStepMetadata):
            raise TypeError(f"cpu_offload: unexpected step metadata {type(metadata).__name__}")
        self._meta = metadata
        self._closed.update(metadata.closed)
        self._deferred.extend(s for s in metadata.stores if s.after_forward)

    def clear_step_metadata(self) -> None:
        self._meta = None

    def _submit(self, kind: str, job: LoadJob | StoreJob) -> None:
        task = CopyTask(kind, job.request_id, list(job.block_ids), list(job.slots), list(job.keys),
                        nbytes=len(job.block_ids) * self.kv_bytes_per_block, groups=list(job.groups))
        self._inflight.setdefault(job.request_id, []).append(task)
        if isinstance(job, LoadJob) and job.error is not None:
            task.error, task.done = job.error, True
            self._complete(task)
            return
        if self._copier is None:
            task.error, task.done = "KV caches were never registered", True
            self._complete(task)
            return
        self._copier.submit(task)

    def start_load_kv(self) -> None:
        meta = self._meta
        if meta is None:
            return
        if meta.preempted:
            self._wait_for_requests(meta.preempted)
        for job in meta.loads:
            self._submit("load", job)
        for st in meta.stores:
            if not st.after_forward:
                self._submit("store", st)

    def _wait_for_requests(self, request_ids: list[str]) -> None:
        tasks = [t for rid in request_ids for t in self._inflight.get(rid, ()) if not t.done]
        if not tasks or self._copier is None:
            return
        if not self._copier.wait(tasks, PREEMPT_WAIT_S):
            for t in tasks:
                t.cancelled = True
            logger.error("cpu_offload: copies of preempted requests %s still running after %.0f s",
                         request_ids, PREEMPT_WAIT_S)

    def wait_for_save(self) -> None:
        deferred, self._deferred = self._deferred, []
        for st in deferred:
            self._submit("store", st)

    def _complete(self, task: CopyTask) -> None:
        ok = task.error is None
        kind = task.kind
        if ok:
            self._counters.add_copy(kind, task.nbytes, len(task.block_ids), task.seconds)
            record_transfer(self._transfers, kind, task.seconds, task.nbytes)
        else:
            self._counters.add_failure(kind, task.failed_check)
            logger.warning("cpu_offload: %s for request %s failed: %s", kind, task.request_id, task.error)
        if kind == "load":
            self._out.finished_recving.add(task.request_id)
            if not ok:
                self._out.failed_recving.add(task.request_id)
                self._out.invalid_block_ids.update(task.block_ids)
        elif not ok:
            self._store_failed.add(task.request_id)
        lst = self._inflight.get(task.request_id)
        if lst is not None:
            lst[:] = [t for t in lst if t is not task]
            if not lst:
                del self._inflight[task.request_id]

    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults:
        if self._deferred:  # a step without wait_for_save: its stores still have to run
            self.wait_for_save()
        if self._copier is not None:
            for task in self._copier.poll():
                self._complete(task)
        out, self._out = self._out, TransferResults()
        for rid in list(self._closed):
            if rid not in self._inflight:
                self._closed.discard(rid)
                out.finished_sending.add(rid)
                if rid in self._store_failed:
                    self._store_failed.discard(rid)
                    out.failed_sending.add(rid)
        stats: dict[str, Any] = self._counters.take()
        if self._transfers:
            stats.update(self._transfers)
            self._transfers = {}
        if stats:
            out.stats = stats
        return out

    def shutdown(self) -> None:
        if self._copier is not None:
            self._copier.close()
        if self._helpers is not None:
            self._helpers.close()
