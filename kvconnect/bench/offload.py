"""``kvconnect bench offload``: CPU-offload store and load bandwidth through the backend's worker,
next to a plain copy of the same bytes in the same run, and prefix-lookup cost against the number
of stored blocks.

Default model: 32 layers, 8 KV heads, head dim 128, bf16, flash-attention NHD layout
``[2, blocks, block_size, heads, dim]`` per layer, engine block ids shuffled (a fragmented cache),
jobs of ``--blocks-per-request`` blocks. Each figure is the median of ``--repeats`` runs; the
copies of one repeat run back to back so they share the machine's state, and each ratio is the
median of the per-repeat ratios.

The reference is a plain contiguous copy of the same bytes with the same parallelism: on the CPU,
torch's ``copy_`` with as many threads as the backend's ``copy_threads`` (each thread count is a
row of the table); on a GPU (used when CUDA is available, or ``--device cuda``), one
device->host copy into the same pinned pool for stores and one host->device copy for loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence

import torch

from kvconnect.api import EngineInfo, RequestView
from kvconnect.backends.cpu_offload import CpuOffloadScheduler, CpuOffloadWorker
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadStepMetadata, StoreJob
from kvconnect.config import CpuOffloadConfig
from kvconnect.layout import FLASH_NHD_DIMS, KVLayout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvconnect bench offload", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--gb", type=float, default=2.0, help="GB of blocks moved per direction and block size")
    p.add_argument("--blocks-per-request", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--copy-threads", type=int, nargs="+", default=None,
                   help="CPU copy threads to measure (default: 1 and the number of cores, at most 4)")
    p.add_argument("--lookup-stored", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--lookup-prefix-blocks", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda":
        a.copy_threads = [1]  # copies are DMA on a stream; threads do not apply
    elif a.copy_threads is None:
        a.copy_threads = sorted({1, min(4, os.cpu_count() or 1)})
    if a.quick:
        a.layers, a.gb, a.repeats = min(a.layers, 4), min(a.gb, 0.05), min(a.repeats, 3)
        a.lookup_stored = [s for s in a.lookup_stored if s <= 10_000] or [1_000]
    return a


def _run(worker: CpuOffloadWorker, meta: OffloadStepMetadata, expect: int, timeout: float = 600.0) -> float:
    """Drive one step through the worker and wait until ``expect`` requests reported."""
    t0 = time.perf_counter()
    worker.bind_step_metadata(meta)
    worker.start_load_kv()
    worker.wait_for_save()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        r = worker.get_transfer_results(set())
        if r.failed_recving or r.failed_sending:
            raise RuntimeError(f"benchmark copy failed: {r}")
        seen |= r.finished_sending | r.finished_recving
        if len(seen) >= expect:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark copies did not finish")
        time.sleep(0.0002)
    worker.clear_step_metadata()
    return time.perf_counter() - t0


class _Threads:
    """torch's intra-op thread count, for the duration of the reference copy."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def _plain_copy(w: CpuOffloadWorker, threads: int, to_engine: bool) -> float:
    """The physical limit: one contiguous copy of the same bytes per layer."""
    cuda = w.layers[0].engine.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with _Threads(threads):
        for lc in w.layers:
            pool = lc.pool.view(-1)
            engine = lc.engine.view(-1)[: pool.numel()]
            if to_engine:
                engine.copy_(pool, non_blocking=cuda)
            else:
                pool.copy_(engine, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t0


def _differ(what: str, engine: torch.Tensor, pool: torch.Tensor, li: int, block_ids: Sequence[int]) -> None:
    """Raise unless every byte of ``engine`` (blocks first) equals ``pool``."""
    e, p = engine.contiguous().view(torch.uint8).cpu(), pool.contiguous().view(torch.uint8)
    bad = (e != p).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"offload benchmark: {what}: {len(bad)} of {len(e)} blocks of layer {li} differ "
                           f"from the host pool (first: engine block {block_ids[bad[0]]}, slot {bad[0]})")


def verify(w: CpuOffloadWorker, src: list[int], dst: list[int], n: int,
           chunks: list[tuple[str, slice]], keys: list[bytes]) -> None:
    """After the timed runs (whose reference copies overwrite both sides), the same jobs once more,
    untimed, every byte of every layer: a store of fresh random bytes must put block ``src[i]``
    in slot ``i``, and a load into blocks refilled with other bytes must bring slot ``i`` back
    into block ``dst[i]``. Raises RuntimeError naming the first wrong block."""
    def sync() -> None:
        if w.layers[0].engine.is_cuda:
            torch.cuda.synchronize()

    for kind, ids in (("store", src), ("load", dst)):
        for lc in w.layers:  # store: new bytes to store; load: bytes the load must overwrite
            lc.engine.view(torch.uint8).random_()
        sync()
        jobs = [(StoreJob if kind == "store" else LoadJob)(request_id=f"verify-{kind}{rid}", block_ids=ids[s],
                                                           slots=list(range(n))[s], keys=keys[s]) for rid, s in chunks]
        meta = OffloadStepMetadata(stores=jobs, closed=[j.request_id for j in jobs]) if kind == "store" else \
            OffloadStepMetadata(loads=jobs)
        _run(w, meta, len(jobs))
        sync()
        for li, lc in enumerate(w.layers):
            _differ(f"the verification {kind}", lc.engine.movedim(lc.block_dim, 0)[ids], lc.pool[:n], li, ids)


def bandwidth(a: argparse.Namespace, block_size: int, threads: int) -> dict[str, float]:
    dtype = DTYPES[a.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * a.kv_heads * a.head_dim * itemsize
    per_block = per_layer * a.layers
    n = max(1, int(a.gb * 1e9 // per_block))
    nb = n + 8
    caches = {}
    for i in range(a.layers):
        t = torch.empty((2, nb, block_size, a.kv_heads, a.head_dim), dtype=dtype, device=a.device)
        t.view(torch.uint8).random_()
        caches[f"layer.{i}"] = (t, KVLayout.of_tensor(t, FLASH_NHD_DIMS))
    cfg = CpuOffloadConfig(cpu_bytes_to_use=n * per_block, per_rank=True, copy_threads=threads)
    w = CpuOffloadWorker(cfg, EngineInfo("bench", block_sizes=(block_size,)))
    w.register_kv_caches(caches)
    for lc in w.layers:  # fault the pool in before timing
        lc.pool.view(torch.uint8).zero_()
    g = torch.Generator().manual_seed(0)
    src = torch.randperm(nb, generator=g)[:n].tolist()
    dst = torch.randperm(nb, generator=g)[:n].tolist()
    keys = [i.to_bytes(8, "little") for i in range(n)]
    per = a.blocks_per_request
    chunks = [(f"r{j}", slice(j, min(j + per, n))) for j in range(0, n, per)]
    nbytes = n * per_block
    store_t, load_t, out_t, in_t = [], [], [], []
    for rep in range(a.repeats):
        before = _plain_copy(w, threads, to_engine=False)
        stores = [StoreJob(request_id=f"s{rep}{rid}", block_ids=src[s], slots=list(range(n))[s], keys=keys[s])
                  for rid, s in chunks]
        store_t.append(_run(w, OffloadStepMetadata(stores=stores, closed=[j.request_id for j in stores]), len(stores)))
        loads = [LoadJob(request_id=f"l{rep}{rid}", block_ids=dst[s], slots=list(range(n))[s], keys=keys[s])
                 for rid, s in chunks]
        load_t.append(_run(w, OffloadStepMetadata(loads=loads), len(loads)))
        for i in (0, n // 2, n - 1):  # byte-for-byte check of a few loaded blocks
            for lc in w.layers[:2]:
                if not torch.equal(lc.engine[:, dst[i]].cpu().view(torch.uint8), lc.pool[i].view(torch.uint8)):
                    raise RuntimeError("benchmark round trip corrupted data")
        out_t.append(min(before, _plain_copy(w, threads, to_engine=False)))  # the faster: a strict reference
        in_t.append(_plain_copy(w, threads, to_engine=True))
    verify(w, src, dst, n, chunks, keys)
    w.shutdown()
    out = {
        "threads": threads,
        "blocks": n,
        "bytes": nbytes,
        "block_bytes": per_block,
        "store_gbps": nbytes / statistics.median(store_t) / 1e9,
        "load_gbps": nbytes / statistics.median(load_t) / 1e9,
        "memcpy_gbps": nbytes / statistics.median(out_t) / 1e9,
        "memcpy_load_gbps": nbytes / statistics.median(in_t) / 1e9,
        "verified_bytes": 2 * nbytes,  # by verify(): one more store and load
    }
    # Ratios pair each copy with the reference taken next to it (the machine drifts between repeats).
    out["store_ratio"] = statistics.median(r / t for r, t in zip(out_t, store_t))
    out["load_ratio"] = statistics.median(r / t for r, t in zip(in_t, load_t))
    return out


def lookup_cost(a: argparse.Namespace) -> list[dict[str, float]]:
    """Per-call time of a prefix lookup hitting ``lookup_prefix_blocks`` blocks, against the number
    of blocks stored in the tier (memoised keys: repeated calls; fresh: first call, hashing too)."""
    bs, prefix = 16, a.lookup_prefix_blocks
    rows = []
    for stored in a.lookup_stored:
        s = CpuOffloadScheduler(
            CpuOffloadConfig(cpu_bytes_to_use=stored + prefix),
            EngineInfo("bench", block_sizes=(bs,), model_signature={"kv_bytes_per_block": 1}),
        )
        idx = s.index
        assert idx is not None
        filler = [os.urandom(16) for _ in range(stored)]
        idx.commit(idx.reserve(filler), filler)
        tokens = list(range(prefix * bs + 1))
        keys = s._keys.keys(RequestView("seed", tokens), prefix)
        slots = idx.reserve(keys)
        idx.commit(slots, keys)
        view = RequestView("q", tokens)
        assert s.get_num_new_matched_tokens(view, 0)[0] == prefix * bs
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            s.get_num_new_matched_tokens(view, 0)
        warm = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for i in range(reps // 4):
            s.get_num_new_matched_tokens(RequestView(f"f{i}", tokens), 0)
        fresh = (time.perf_counter() - t0) / (reps // 4)
        rows.append({"stored_blocks": stored, "prefix_blocks": prefix, "lookup_us": warm * 1e6,
                     "first_lookup_us": fresh * 1e6})
    return rows


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} <-> pinned host memory"
    return f"CPU ({os.cpu_count()} cores)"


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("kvconnect").setLevel(logging.WARNING)
    a = _args(argv)
    rows = [bandwidth(a, bs, th) | {"block_size": bs} for bs in a.block_sizes for th in a.copy_threads]
    lookups = lookup_cost(a)
    head = max((r for r in rows if r["block_size"] == a.block_sizes[0]), key=lambda r: r["threads"])
    result = {
        "model": {"layers": a.layers, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dtype": a.dtype},
        "device": _device_name(a.device),
        "store_gbps": head["store_gbps"],
        "load_gbps": head["load_gbps"],
        "memcpy_gbps": head["memcpy_gbps"],
        "memcpy_load_gbps": head["memcpy_load_gbps"],
        "rows": rows,
        "lookup": lookups,
    }
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"CPU offload bandwidth on {result['device']} ({a.layers} layers, {a.kv_heads} KV heads, "
          f"head dim {a.head_dim}, {a.dtype}; median of {a.repeats})")
    print(f"{'block':>6} {'threads':>7} {'blocks':>7} {'GB':>6} {'store GB/s':>11} {'load GB/s':>10} "
          f"{'copy out':>9} {'copy in':>8} {'store/copy':>11} {'load/copy':>10}")
    for v in rows:
        print(f"{v['block_size']:>6} {v['threads']:>7} {v['blocks']:>7} {v['bytes'] / 1e9:>6.2f} "
              f"{v['store_gbps']:>11.2f} {v['load_gbps']:>10.2f} {v['memcpy_gbps']:>9.2f} "
              f"{v['memcpy_load_gbps']:>8.2f} {v['store_ratio']:>11.2f} {v['load_ratio']:>10.2f}")
    print("(copy out / copy in: a plain contiguous copy of the same bytes, engine -> pool / pool -> engine, "
          "same thread count)")
    print(f"\nPrefix lookup ({lookups[0]['prefix_blocks']}-block hit, 16-token blocks)")
    print(f"{'stored blocks':>14} {'lookup us':>10} {'first lookup us':>16}")
    for r in lookups:
        print(f"{r['stored_blocks']:>14} {r['lookup_us']:>10.1f} {r['first_lookup_us']:>16.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
