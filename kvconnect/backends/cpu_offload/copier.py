"""Moving blocks between engine KV tensors and the host pool, off the engine's hot path.

:func:`copy_blocks` does the bytes: per piece of engine memory (a layer, or all the entries that
view one layer's memory, merged: see :mod:`rows`) and per run of consecutive slots, one gather
(store) or one scatter (load) of whole rows, so every byte is read and written once and memory
that is contiguous in the engine moves as one run. On the CPU these are numpy's ``take(out=...)`` and fancy
assignment (a plain memcpy per row, GIL released), split over ``copy_threads`` threads for large tasks: one
thread cannot saturate the memory bus; a plain ``copy_`` of a large tensor is multi-threaded too. On a GPU
the gather and scatter run on the device and the host side is one DMA per run.

Two executors run :class:`CopyTask` s in submission order, so a load that follows a store into
the same slot sees that store's bytes (or its key check fails):

* :class:`ThreadCopier` (KV caches on the CPU): one background thread runs each task whole.
* :class:`CudaStreamCopier` (KV caches on a GPU): tasks are enqueued on two dedicated streams
  (kernels, DMA) that first wait for the engine's current stream (so stores see the forward
  pass's writes); an event per task tells when it is done. Nothing blocks the forward pass.
  Tasks stay ordered: each stream runs in submission order and a task ends on the kernel
  stream after waiting for the DMA stream.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvconnect.backends.cpu_offload.rows import (
    Entry,
    SpanPlan,
    block_shape,
    engine_row_view,
    plan_spans,
    pool_row_view,
)
from kvconnect.backends.cpu_offload.stats import LoadCheck
from kvconnect.errors import LayoutError
from kvconnect.layout import KVLayout

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LayerCopy:
    """One piece of engine memory and its host pool: the rows of a :class:`SpanPlan` (one or
    several entries that share memory, merged), or, for an entry whose strides do not split into
    rows (``plan`` None), that entry alone, copied by indexing its block dimension."""

    engine: torch.Tensor  # the (first) entry's tensor; the row view below reaches its storage
    pool: torch.Tensor  # [num_slots, block bytes] bytes with a plan, [num_slots, *block_shape] without
    block_dim: int
    plan: SpanPlan | None
    group: int = 0
    names: tuple[str, ...] = ()
    engine_rows: torch.Tensor | None = None
    pool_rows: torch.Tensor | None = None
    #: The same row views as numpy arrays (CPU caches only): numpy copies rows fastest.
    engine_np: np.ndarray | None = None
    pool_np: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.plan is not None:
            self.group, self.names = self.plan.group, self.plan.names
            self.engine_rows = engine_row_view(self.engine, self.plan)
            self.pool_rows = pool_row_view(self.pool, self.plan, self.engine_rows.element_size())
            if self.engine.device.type == "cpu":
                self.engine_np = self.engine_rows.numpy()
                self.pool_np = self.pool_rows.numpy()

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks if self.plan is not None else int(self.engine.shape[self.block_dim])

    @property
    def rows_key(self) -> tuple | None:
        return None if self.plan is None else self.plan.key


def build_layers(
    caches: Mapping[str, tuple[torch.Tensor, KVLayout]],
    num_slots: int,
    pin_memory: bool = False,
    share_pools_with: Sequence[LayerCopy] | None = None,
) -> list[LayerCopy]:
    """Host pools and row plans for registered entries: entries that view one piece of memory
    (vLLM CPU's ``.k`` and ``.v`` of a layer) share one pool holding the engine's block bytes in
    the engine's order, so each block moves in as few runs as the engine's memory allows.

    ``share_pools_with``: layers built before (another KV-cache group's, whose layers line up
    with these by position): the i-th piece of memory here uses the i-th pool there, which must
    have the same shape and dtype (a slot then holds one block of one group)."""
    entries = [Entry.of(name, t, lay) for name, (t, lay) in caches.items()]
    plans, left = plan_spans(entries)
    out = []

    def pool_for(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if share_pools_with is None:
            return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        i = len(out)
        other = share_pools_with[i] if i < len(share_pools_with) else None
        if other is None or tuple(other.pool.shape) != shape or other.pool.dtype != dtype:
            raise LayoutError(f"cpu_offload: piece of memory {i} ({shape}, {dtype}) has no pool of that "
                              "shape to share at the same position")
        return other.pool

    for plan in plans:
        t, lay = caches[plan.names[0]]
        out.append(LayerCopy(t, pool_for((num_slots, plan.block_bytes), torch.uint8),
                             lay.dims.index("block"), plan))
    for e in left:
        logger.warning("cpu_offload: entry %s has strides that do not split into rows; copies take an "
                       "extra pass", e.name)
        t, lay = caches[e.name]
        out.append(LayerCopy(t, pool_for((num_slots, *block_shape(lay)), t.dtype), lay.dims.index("block"),
                             None, lay.group, (e.name,)))
    logger.info(
        "cpu_offload: %d entries copied as %d pieces of memory, %d rows per block (%d entries "
        "by block indexing)",
        len(entries),
        len(plans),
        sum(p.rows_per_block for p in plans),
        len(left),
    )
    return out


@dataclass(slots=True)
class CopyTask:
    kind: str  # "load" or "store"
    request_id: str
    block_ids: list[int]
    slots: list[int]
    keys: list[bytes]
    nbytes: int = 0
    #: KV-cache group of each block (hybrid models); empty: all in group 0.
    groups: list[int] = field(default_factory=list)
    error: str | None = None
    #: The check that refused the load before its copy, if one did (counted on its own).
    failed_check: LoadCheck | None = None
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


class CopyHelpers:
    """Threads that take shares of a large CPU copy beside the thread that runs the task."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="kvconnect-offload-copy-helper")

    def submit(self, fn: Callable[..., None], *args: Any) -> Any:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


#: Below this many bytes per thread a task is not split: waking threads costs more than it saves.
SPLIT_MIN_BYTES = 4 << 20

#: One row copy on the CPU: (engine rows, engine row ids, pool rows of the run).
_Move = tuple[np.ndarray, np.ndarray, np.ndarray]


def _run_moves(kind: str, moves: Sequence[_Move]) -> None:
    for e, r, p in moves:
        if kind == "store":
            # mode="clip" skips numpy's buffered bounds check (ids were validated by the caller).
            np.take(e, r, axis=0, out=p, mode="clip")
        else:
            e[r] = p


def _split(moves: Sequence[_Move], parts: int) -> list[list[_Move]]:
    """``parts`` lists of equal share of every move's rows (threads then finish together)."""
    out: list[list[_Move]] = [[] for _ in range(parts)]
    for e, r, p in moves:
        n = len(r)
        for i in range(parts):
            a, b = n * i // parts, n * (i + 1) // parts
            if b > a:
                out[i].append((e, r[a:b], p[a:b]))
    return out


def _copy_cpu(layers: Sequence[LayerCopy], kind: str, ids: torch.Tensor, runs: list[tuple[int, int, int]],
              helpers: CopyHelpers | None) -> None:
    moves: list[_Move] = []
    rows_cache: dict[Any, np.ndarray] = {}
    nbytes = 0
    for lc in layers:
        if lc.plan is None:
            _copy_logical(lc, kind, ids, runs, None)
            continue
        rows = rows_cache.get(lc.rows_key)
        if rows is None:
            rows = rows_cache[lc.rows_key] = lc.plan.engine_rows(ids).numpy()
        per = lc.plan.rows_per_block
        assert lc.engine_np is not None and lc.pool_np is not None
        for a, b, s0 in runs:
            moves.append((lc.engine_np, rows[a * per : b * per], lc.pool_np[s0 * per : (s0 + b - a) * per]))
        nbytes += len(ids) * lc.plan.block_bytes
    parts = 1 if helpers is None else min(helpers.count + 1, nbytes // SPLIT_MIN_BYTES)
    if parts <= 1:
        _run_moves(kind, moves)
        return
    shares = _split(moves, parts)
    futures = [helpers.submit(_run_moves, kind, share) for share in shares[1:]]
    _run_moves(kind, shares[0])  # this thread takes a share too
    for f in futures:
        f.result()


def _copy_logical(lc: LayerCopy, kind: str, ids: torch.Tensor, runs: list[tuple[int, int, int]],
                  keep: list | None) -> None:
    """Exotic strides: index the block dimension itself (one extra pass, always correct)."""
    on_gpu = lc.engine.device.type != "cpu"
    ev = lc.engine.movedim(lc.block_dim, 0)
    for a, b, s0 in runs:
        prange = lc.pool[s0 : s0 + b - a]
        if kind == "store":
            g = ev.index_select(0, ids[a:b])
            prange.copy_(g, non_blocking=on_gpu)
            if keep is not None:
                keep.append(g)
        else:
            ev.index_copy_(0, ids[a:b], prange.to(lc.engine.device, non_blocking=True))


def _copy_gpu(layers: Sequence[LayerCopy], kind: str, ids_cpu: torch.Tensor, runs: list[tuple[int, int, int]],
              keep: list, dma: Any) -> None:
    """Gather/scatter kernels on the current stream, host<->device DMA on ``dma`` (when given), one
    event per layer between them: layer i's DMA overlaps layer i+1's kernel (measured on an H100:
    0.95-0.97x of a plain copy pipelined, 0.85-0.89x one after the other)."""
    device = layers[0].engine.device
    comp = torch.cuda.current_stream(device)
    dma = dma or comp
    ids = ids_cpu.to(device, non_blocking=True)
    keep.append(ids)
    rows_cache: dict[Any, torch.Tensor] = {}
    for lc in layers:
        if lc.plan is None:
            with torch.cuda.stream(comp):
                _copy_logical(lc, kind, ids, runs, keep)
            continue
        rows = rows_cache.get(lc.rows_key)
        if rows is None:
            rows = lc.plan.engine_rows(ids_cpu).to(device, non_blocking=True)
            rows_cache[lc.rows_key] = rows
            keep.append(rows)
        per = lc.plan.rows_per_block
        e, p = lc.engine_rows, lc.pool_rows
        for a, b, s0 in runs:
            r = rows[a * per : b * per]
            prange = p[s0 * per : (s0 + b - a) * per]
            g = torch.empty_like(prange, device=device)  # on comp: lives until the task's event
            keep.append(g)
            if kind == "store":  # gather on the device, then one DMA into the pinned run
                torch.index_select(e, 0, r, out=g)
                ev = torch.cuda.Event()
                ev.record(comp)
                dma.wait_event(ev)
                with torch.cuda.stream(dma):
                    prange.copy_(g, non_blocking=True)
            else:  # one DMA of the run, then scatter on the device
                with torch.cuda.stream(dma):
                    g.copy_(prange, non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(dma)
                comp.wait_event(ev)
                e.index_copy_(0, r, g)
    comp.wait_stream(dma)  # the task's event, recorded on comp, covers both streams


def copy_blocks(
    layers: Sequence[LayerCopy], kind: str, block_ids: Sequence[int], slots: Sequence[int],
    keep: list | None = None, helpers: CopyHelpers | None = None, dma_stream: Any = None,
) -> None:
    """Store (engine -> pool) or load (pool -> engine) ``block_ids[i] <-> slots[i]`` in every
    layer given (the layers of one KV-cache group: block ids index that group's blocks). Ids must
    be in range (the caller checks). On a GPU the ops are enqueued on the current stream (DMA on
    ``dma_stream`` if given); ``keep`` collects temporaries that must outlive them. On the CPU
    ``helpers`` share large tasks."""
    if not block_ids:
        return
    ids_cpu = torch.as_tensor(block_ids, dtype=torch.int64)
    runs = slot_runs(slots)
    if layers[0].engine.device.type == "cpu":
        _copy_cpu(layers, kind, ids_cpu, runs, helpers)
    else:
        _copy_gpu(layers, kind, ids_cpu, runs, keep if keep is not None else [], dma_stream)


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
        self.stream = torch.cuda.Stream(device=device)  # gather/scatter kernels
        self.dma_stream = torch.cuda.Stream(device=device)  # host<->device copies
        self._inflight: deque[CopyTask] = deque()

    def submit(self, task: CopyTask) -> None:
        task.seconds = time.perf_counter()  # start time until done
        engine_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(engine_stream)
            self.dma_stream.wait_stream(engine_stream)
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
