"""The worker's store I/O: jobs, the threads that run them, and the put / get of one job.

Every Mooncake call blocks (measured: a dead master makes a put or get return an error after about
4 s, a stopped memory holder holds a get for 13-60 s), so no call runs on the engine thread.
Each :class:`Lane` is one thread with a queue; the worker keeps one for loads and one for stores,
so a slow store never delays a load. A job carries its deadline: no batch starts after it, and a
job that reaches the front of its queue after it is failed without a call.

Per job, in batches of ``batch_objects`` objects:

* **store**: one existence query, then checksum and header of each missing block, then
  ``batch_put_from_multi_buffers`` straight from the engine's blocks. A failed put is counted;
  nothing is retried (the next request with the prefix stores it again).
* **load**: ``batch_get_into_multi_buffers`` straight into the engine's blocks, then each object is
  verified in chain order (length, header, checksum). The first object that is missing or fails
  ends the load there: the blocks before it are good, the rest are reported invalid. An object
  that fails verification is removed from the store so that a later store can replace it.

With a :class:`~kvconnect.backends.mooncake.staging.Staging` buffer (KV caches in GPU memory, or
``staging="always"``) the calls name staging slots instead of the engine's blocks: a store
gathers its missing blocks into slots before the checksum; a load verifies the objects in the
slots and only then scatters the good ones into the engine's blocks, so nothing unverified ever
reaches them. Loads and stores run at once, so each lane has its own half of the slots, and a
batch is at most half of that (two batches in flight): a job larger than the buffer moves in
chunks.

When a load may be reported (:meth:`Job.expire`). A get cannot be cancelled, and once a load is
reported, failed or not, the engine owns its blocks again: it recomputes into them, or frees them
(a failed load with no good block, ``kv_load_failure_policy=fail``, an abort) for another request.
So a load is never reported while a get into the engine's blocks may still be running:

* still queued at its deadline (no call made, none will be): reported failed at the deadline;
* staged: reported failed at the deadline; its get lands in staging slots, and the scatter into
  the engine's blocks happens under ``Job.lock`` only while the load is not reported;
* zero-copy with a get in flight: reported when the get returns (the job ends: no batch starts
  after the deadline). Mooncake's calls end by themselves (0.3.13 over TCP, measured: a killed
  memory holder fails a get with -800 in 1.0 s, a stopped (SIGSTOP) one in 60.0 s), so the wait
  past ``load_timeout_s`` is at most one call.

Sending late loads into a bounce buffer instead would need every zero-copy get to name one (a
started call cannot be pointed elsewhere): the staged path's extra copy on every load, paid to
shorten only the rare load that meets a store that stopped answering.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kvconnect.backends.mooncake import objects as ob
from kvconnect.backends.mooncake.staging import Staging
from kvconnect.backends.mooncake.stats import WorkerCounters
from kvconnect.backends.mooncake.store import RPC_FAIL, TRANSFER_FAIL, SharedStore

logger = logging.getLogger(__name__)


class _StoreDown(Exception):
    """A batch cannot be stored because the store did not answer."""


@dataclass(eq=False)
class Job:
    kind: str  # "load" or "save"
    request_id: str
    block_ids: list[int]
    keys: list[bytes]
    deadline: float
    #: Staging only: what the engine had written when the job was submitted (a CUDA event).
    marker: Any = None
    #: Leading blocks loaded and verified (loads), or stored / already present (saves).
    good: int = 0
    error: str | None = None
    done: bool = False
    #: The lane took the job from its queue and made (or is making) store calls for it.
    started: bool = False
    #: The engine was told about this load already (failed at its deadline: :meth:`expire`).
    reported: bool = False
    nbytes: int = 0
    seconds: float = 0.0
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    #: Guards ``started`` and ``reported``, and is held while verified objects are copied into
    #: the engine's blocks (staging): a load is reported early only when it can take this.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> bool:
        """Lane: whether to run the job now it is at the front of the queue (not when the engine
        was told already, or when its deadline passed)."""
        with self.lock:
            if self.reported:
                return False
            if time.monotonic() > self.deadline:
                self.error = "deadline passed while queued (the store is slow or down)"
                self.counters.deadline_misses += 1
                return False
            self.started = True
            return True

    def expire(self, why: str, writes_blocks: bool) -> bool:
        """Engine, for a load past its deadline: fail it now if no store call can still write into
        the engine's blocks (still queued, or the calls name staging slots: ``writes_blocks`` is
        False); True when it was failed. Otherwise the lane's return reports it."""
        if not self.lock.acquire(blocking=False):
            return False  # the lane is starting it or copying verified blocks in: ask again
        try:
            if self.reported or self.done or (self.started and writes_blocks):
                return False
            self.error = self.error or why
            self.good = 0  # whatever landed in staging was not delivered
            self.reported = True
            return True
        finally:
            self.lock.release()


class Lane:
    """One I/O thread running jobs in order; finished jobs wait in ``done`` for the engine."""

    def __init__(self, name: str, run: Callable[[Job], None]) -> None:
        self._run = run
        self._q: queue.Queue[Job | None] = queue.Queue()
        self.done: collections.deque[Job] = collections.deque()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._q.put(job)

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            t0 = time.monotonic()
            if job.begin():
                try:
                    self._run(job)
                except Exception as e:  # a bug or a library error must not kill the lane
                    logger.exception("mooncake: %s job for %s raised", job.kind, job.request_id)
                    job.error = f"{type(e).__name__}: {e}"
            job.seconds = time.monotonic() - t0
            job.done = True
            self.done.append(job)

    def close(self, timeout_s: float = 5.0) -> None:
        self._q.put(None)
        self._thread.join(timeout_s)


class StoreIO:
    """Put and get of jobs against one rank's KV caches."""

    def __init__(self, shared: SharedStore, blocks: ob.BlockObjects | Staging, prefix: str,
                 layout: bytes, batch_objects: int) -> None:
        self.sh = shared
        self.store = shared.store
        self.blocks = blocks
        self.staging = blocks if isinstance(blocks, Staging) else None
        #: Each lane's first staging slot: a store's gather never lands in a load's slots.
        self._slot0 = {"load": 0, "save": 0}
        if self.staging is not None:
            batch_objects = min(batch_objects, self.staging.slots // 4)
            self._slot0["save"] = self.staging.slots // 2
        self.prefix = prefix
        self.layout = layout
        self.batch = batch_objects
        self.payload = blocks.payload_bytes
        self.object_bytes = self.payload + ob.HEADER_BYTES
        # Per lane (lanes run concurrently): header buffers for two batches (one in flight, one
        # being prepared or verified) and a helper thread for checksum work.
        self._headers = {k: ob.HeaderPool(2 * batch_objects) for k in ("load", "save")}
        self._pools = {k: ThreadPoolExecutor(1, thread_name_prefix=f"kvc-mooncake-crc-{k}")
                       for k in ("load", "save")}
        for hp in self._headers.values():
            shared.register(hp.base, hp.nbytes)

    def _key(self, k: bytes) -> str:
        return self.prefix + k.hex()

    def _buffers(self, kind: str, block_ids: list[int], half: int) -> tuple[list[list[int]], list[list[int]]]:
        hp = self._headers[kind]
        ptrs, sizes = [], []
        for i, b in enumerate(block_ids):
            if self.staging is None:
                p, s = self.blocks.runs(b)
            else:
                p, s = self.staging.runs(self._slot0[kind] + half * self.batch + i)
            p.append(hp.ptr(half * self.batch + i))
            s.append(ob.HEADER_BYTES)
            ptrs.append(p)
            sizes.append(s)
        return ptrs, sizes

    def _store_failed(self, codes: list[int], what: str) -> None:
        if any(c in (RPC_FAIL, TRANSFER_FAIL) for c in codes):
            self.sh.health.failed(f"{what} returned {sorted(set(codes))[:3]}")

    # -- save -------------------------------------------------------------------------------------
    def spans(self, n: int, small_last: bool) -> list[tuple[int, int]]:
        """``[lo, hi)`` batches of ``batch`` objects over ``n``, but the batch whose checksum work
        overlaps no transfer (a store's first, prepared before any put; a load's last, verified
        after the last get) a quarter of that, so the pipeline fills and drains fast."""
        small = max(1, self.batch // 4)
        if n <= small:
            return [(0, n)] if n else []
        if small_last:
            return [(lo, min(lo + self.batch, n - small)) for lo in range(0, n - small, self.batch)] + \
                [(n - small, n)]
        return [(0, small)] + [(lo, min(lo + self.batch, n)) for lo in range(small, n, self.batch)]

    def _prepare_save(
        self, job: Job, lo: int, hi: int, half: int
    ) -> tuple[list[str], list[list[int]], list[list[int]]]:
        """Existence query, then buffers, checksum and header of each missing block of one batch."""
        keys = [self._key(k) for k in job.keys[lo:hi]]
        blocks = job.block_ids[lo:hi]
        exist = self.store.batch_is_exist(keys)
        if any(e < 0 for e in exist):
            self._store_failed(list(exist), "batch_is_exist")
            raise _StoreDown(f"existence query failed ({min(exist)})")
        todo = [i for i, e in enumerate(exist) if e != 1]
        job.counters.objects_present += len(keys) - len(todo)
        hp = self._headers["save"]
        if self.staging is not None:
            slot = self._slot0["save"] + half * self.batch
            self.staging.gather([blocks[i] for i in todo], slot, after=job.marker)
        ptrs, sizes = self._buffers("save", [blocks[i] for i in todo], half)
        for j, i in enumerate(todo):
            crc = ob.checksum_of(ptrs[j][:-1], sizes[j][:-1])
            ob.pack_header(hp.array[half * self.batch + j], self.payload, crc, self.layout, job.keys[lo + i])
        return [keys[i] for i in todo], ptrs, sizes

    def save(self, job: Job) -> None:
        """Batch k+1 is prepared (existence, checksum) on the helper thread while batch k is put."""
        spans = self.spans(len(job.keys), small_last=False)
        if not spans:
            return
        nxt = self._pools["save"].submit(self._prepare_save, job, *spans[0], 0)
        for n, (lo, hi) in enumerate(spans):
            try:
                keys, ptrs, sizes = nxt.result()
            except _StoreDown as e:
                job.error = str(e)
                job.counters.saves_dropped += len(job.keys) - lo
                return
            if n + 1 < len(spans):
                nxt = self._pools["save"].submit(self._prepare_save, job, *spans[n + 1], (n + 1) % 2)
            if time.monotonic() > job.deadline:
                job.error = "deadline passed"
                job.counters.deadline_misses += 1
                break
            if keys:
                codes = self.store.batch_put_from_multi_buffers(keys, ptrs, sizes, self.sh.replicate)
                bad = [c for c in codes if c != 0]
                if bad:
                    self._store_failed(bad, "batch_put_from_multi_buffers")
                    job.counters.put_failures += len(bad)
                    job.error = f"{len(bad)} of {len(keys)} puts failed (code {bad[0]})"
                    break
                self.sh.health.ok()
                job.nbytes += len(keys) * self.object_bytes
                job.counters.objects_stored += len(keys)
            job.good = hi
        with contextlib.suppress(Exception):
            nxt.result()  # never leave the helper writing a header half the next job reuses

    # -- load -------------------------------------------------------------------------------------
    def _verify(self, job: Job, lo: int, half: int, got: list[int],
                ptrs: list[list[int]], sizes: list[list[int]]) -> tuple[int, str | None]:
        """Verified blocks of one fetched batch, in order, and why the first bad one is bad."""
        hp = self._headers["load"]
        bkeys = job.keys[lo : lo + len(got)]
        for j, n in enumerate(got):
            why = ""
            if n != self.object_bytes:
                why = f"object missing or of another size (get returned {n})"
                self._store_failed([n], "batch_get_into_multi_buffers")
                job.counters.objects_missing += 1
            else:
                crc, why = ob.check_header(
                    hp.array[half * self.batch + j], self.payload, self.layout, bkeys[j]
                )
                if crc is not None and ob.checksum_of(ptrs[j][:-1], sizes[j][:-1]) != crc:
                    why = "checksum mismatch"
                if why:
                    job.counters.objects_corrupt += 1
                    self._remove(bkeys[j])
            if why:
                self._deliver(job, lo, half, j)
                return j, f"block {lo + j} of {len(job.keys)}: {why}"
        self._deliver(job, lo, half, len(got))
        return len(got), None

    def _deliver(self, job: Job, lo: int, half: int, ok: int) -> None:
        """Staging: the verified objects of one batch into the engine's blocks, unless the load
        was reported (failed) already at its deadline."""
        if self.staging is None or not ok:
            return
        with job.lock:
            if job.reported:
                return
            slot = self._slot0["load"] + half * self.batch
            self.staging.scatter(job.block_ids[lo : lo + ok], slot, after=job.marker)

    def load(self, job: Job) -> None:
        """Batch k+1 is fetched while batch k is verified on the helper thread."""
        pending = None  # (lo, future of _verify)

        def settle() -> bool:
            lo, fut = pending
            ok, why = fut.result()
            job.good = lo + ok
            job.nbytes += ok * self.object_bytes
            if why is not None:
                job.error = why
                return False
            return True

        for n, (lo, hi) in enumerate(self.spans(len(job.keys), small_last=True)):
            if time.monotonic() > job.deadline:
                if not job.reported:  # a staged load failed at its deadline was counted then
                    job.error = "deadline passed"
                    job.counters.deadline_misses += 1
                break
            half = n % 2
            bkeys = job.keys[lo:hi]
            ptrs, sizes = self._buffers("load", job.block_ids[lo:hi], half)
            got = self.store.batch_get_into_multi_buffers([self._key(k) for k in bkeys], ptrs, sizes)
            if pending is not None and not settle():
                pending = None
                break
            pending = (lo, self._pools["load"].submit(self._verify, job, lo, half, list(got), ptrs, sizes))
        if pending is not None and settle():
            self.sh.health.ok()

    def _remove(self, key: bytes) -> None:
        try:
            self.store.batch_remove([self._key(key)], True)
        except Exception:
            logger.debug("mooncake: removing a bad object failed", exc_info=True)


    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False)


def merged_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching ``(ptr, size)`` ranges merged (layers may share one allocation)."""
    out: list[list[int]] = []
    for p, n in sorted(ranges):
        if out and p <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], p + n - out[-1][0])
        else:
            out.append([p, n])
    return [(p, n) for p, n in out]


def run_job(io: StoreIO) -> Callable[[Job], Any]:
    return lambda job: io.load(job) if job.kind == "load" else io.save(job)
