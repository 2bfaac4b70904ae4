"""Moving blocks between engine KV tensors and the host pool, off the engine's hot path.

:func:`copy_blocks` does the bytes: per layer and per run of consecutive slots, one gather
(store: ``index_select`` straight into the pool's rows) or one scatter (load) of whole rows (see
:mod:`rows`). The torch and numpy ops used release the GIL.

Two executors run :class:`CopyTask` s in submission order, so a load that follows a store into
the same slot sees that store's bytes (or its key check fails):

* :class:`ThreadCopier` (KV caches on the CPU): one background thread runs each task whole.
* :class:`CudaStreamCopier` (KV caches on a GPU): tasks are enqueued on a dedicated stream that
  first waits for the engine's current stream (so stores see the forward pass's writes); an event
  per task tells when it is done. Nothing blocks the forward pass.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvconnect.backends.cpu_offload.rows import RowPlan, engine_row_view, pool_row_view

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LayerCopy:
    """One layer: the engine's tensor, its host pool, and how to see both as rows."""

    engine: torch.Tensor
    pool: torch.Tensor
    block_dim: int
    plan: RowPlan | None
    plan_key: tuple | None = None
    engine_rows: torch.Tensor | None = None
    pool_rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.plan is not None:
            p = self.plan
            self.plan_key = (p.chunk, p.planes, p.block_step, tuple(p.plane_rows.tolist()))
            self.engine_rows = engine_row_view(self.engine, p)
            self.pool_rows = pool_row_view(self.pool, p)


@dataclass(slots=True)
class CopyTask:
    kind: str  # "load" or "store"
    request_id: str
    block_ids: list[int]
    slots: list[int]
    keys: list[bytes]
    nbytes: int = 0
    error: str | None = None
    #: A counter to bump for the failure (``key_mismatches``, ``checksum_failures``), if any.
    failure_stat: str | None = None
    cancelled: bool = False
    seconds: float = 0.0
    done: bool = False
    event: Any = None
    keep: list = field(default_factory=list)


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first job index, end job index, first slot)`` of each run of consecutive slots."""
    if not slots:
        return []
    s = np.asarray(slots, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], np.diff(s) != 1)))
    ends = np.concatenate((starts[1:], [len(s)]))
    return [(int(a), int(b), int(s[a])) for a, b in zip(starts, ends)]


def _scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    if dst.device.type == "cpu":
        # numpy's row assignment is a plain memcpy per row and beats index_copy_ on CPU.
        dst.view(torch.uint8).numpy()[rows.numpy()] = src.view(torch.uint8).numpy()
    else:
        dst.index_copy_(0, rows, src.to(dst.device, non_blocking=True))


def copy_blocks(
    layers: Sequence[LayerCopy], kind: str, block_ids: Sequence[int], slots: Sequence[int],
    keep: list | None = None,
) -> None:
    """Store (engine -> pool) or load (pool -> engine) ``block_ids[i] <-> slots[i]`` in every
    layer. On a GPU the ops are enqueued on the current stream; ``keep`` collects temporaries
    that must outlive them."""
    if not block_ids:
        return
    device = layers[0].engine.device
    ids_cpu = torch.as_tensor(block_ids, dtype=torch.int64)
    runs = slot_runs(slots)
    rows_cache: dict[Any, torch.Tensor] = {}
    for lc in layers:
        if lc.plan is not None:
            rows = rows_cache.get(lc.plan_key)
            if rows is None:
                rows = lc.plan.engine_rows(ids_cpu)
                if device.type != "cpu":
                    rows = rows.to(device, non_blocking=True)
                rows_cache[lc.plan_key] = rows
            per = lc.plan.planes
            e, p = lc.engine_rows, lc.pool_rows
            for a, b, s0 in runs:
                r = rows[a * per : b * per]
                prange = p[s0 * per : (s0 + b - a) * per]
                if kind == "store":
                    if device.type == "cpu":
                        torch.index_select(e, 0, r, out=prange)
                    else:
                        g = e.index_select(0, r)
                        prange.copy_(g, non_blocking=True)
                        if keep is not None:
                            keep.append(g)
                else:
                    _scatter_rows(e, r, prange)
        else:  # exotic strides: logical indexing, one extra pass
            ev = lc.engine.movedim(lc.block_dim, 0)
            ids = ids_cpu if device.type == "cpu" else ids_cpu.to(device, non_blocking=True)
            for a, b, s0 in runs:
                prange = lc.pool[s0 : s0 + b - a]
                if kind == "store":
                    g = ev.index_select(0, ids[a:b])
                    prange.copy_(g, non_blocking=device.type != "cpu")
                    if keep is not None:
                        keep.append(g)
                else:
                    ev.index_copy_(0, ids[a:b], prange.to(device, non_blocking=True))
    if keep is not None and device.type != "cpu":
        keep.extend(rows_cache.values())


def slot_checksum(layers: Sequence[LayerCopy], slot: int) -> int:
    """Adler-32 of one slot's bytes over every layer (fast, non-cryptographic)."""
    acc = 1
    for lc in layers:
        acc = zlib.adler32(lc.pool[slot].view(torch.uint8).numpy(), acc)
    return acc


class ThreadCopier:
    """Runs tasks one after another on a background thread; ``run`` does the whole task."""

    def __init__(self, run: Callable[[CopyTask], None], name: str = "kvconnect-offload-copy") -> None:
        self._run = run
        self._queue: deque[CopyTask] = deque()
        self._done: deque[CopyTask] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, task: CopyTask) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("copier is closed")
            self._queue.append(task)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                task = self._queue.popleft()
            t0 = time.perf_counter()
            try:
                self._run(task)
            except Exception as e:  # never let the thread die: the task reports the error
                logger.exception("cpu_offload: %s task for %s failed", task.kind, task.request_id)
                task.error = task.error or f"{type(e).__name__}: {e}"
            task.seconds = time.perf_counter() - t0
            with self._cv:
                task.done = True
                self._done.append(task)
                self._cv.notify_all()

    def poll(self) -> list[CopyTask]:
        with self._cv:
            out = list(self._done)
            self._done.clear()
        return out

    def wait(self, tasks: Sequence[CopyTask], timeout: float) -> bool:
        """Block until every task in ``tasks`` is done or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not all(t.done for t in tasks):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("cpu_offload: copy thread still busy after %.1f s at shutdown", timeout)


class CudaStreamCopier:
    """Enqueues tasks on a dedicated CUDA stream; ``start`` enqueues a task's copies (on the
    current stream, which is ours while it runs), ``finish`` does its host-side bookkeeping once
    its event has completed."""

    def __init__(
        self, device: torch.device, start: Callable[[CopyTask], None], finish: Callable[[CopyTask], None]
    ) -> None:
        self.device = device
        self._start = start
        self._finish = finish
        self.stream = torch.cuda.Stream(device=device)
        self._inflight: deque[CopyTask] = deque()

    def submit(self, task: CopyTask) -> None:
        task.seconds = time.perf_counter()  # start time until done
        engine_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(engine_stream)
            try:
                self._start(task)
            except Exception as e:
                logger.exception("cpu_offload: enqueueing %s for %s failed", task.kind, task.request_id)
                task.error = task.error or f"{type(e).__name__}: {e}"
            task.event = torch.cuda.Event()
            task.event.record(self.stream)
        self._inflight.append(task)

    def _complete(self, task: CopyTask) -> None:
        task.seconds = time.perf_counter() - task.seconds
        try:
            self._finish(task)
        except Exception as e:
            logger.exception("cpu_offload: finishing %s for %s failed", task.kind, task.request_id)
            task.error = task.error or f"{type(e).__name__}: {e}"
        task.keep.clear()
        task.done = True

    def poll(self) -> list[CopyTask]:
        out = []
        while self._inflight and self._inflight[0].event.query():
            task = self._inflight.popleft()
            self._complete(task)
            out.append(task)
        return out

    def wait(self, tasks: Sequence[CopyTask], timeout: float) -> bool:
        """Wait (bounded) for ``tasks``; completed ones are picked up by the next :meth:`poll`."""
        deadline = time.monotonic() + timeout
        for t in tasks:
            while not t.done and not t.event.query():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.0005)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.wait(list(self._inflight), timeout)
