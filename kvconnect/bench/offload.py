"""``kvconnect bench offload``: CPU-offload store and load bandwidth through the backend's worker,
next to a plain copy of the same bytes in the same run, and prefix-lookup cost against the number
of stored blocks.

Model: 32 layers, 8 KV heads, head dim 128, bf16, engine block ids shuffled (a fragmented cache),
jobs of ``--blocks-per-request`` blocks. By default each device gets the layouts its engines
really use: on the CPU vLLM's CPU worker cache ``[blocks, heads, block_size, 2*head_dim]``,
registered through the same entries as the vLLM adapter (a ``.k`` and a ``.v`` view per layer),
and flash-attention NHD ``[2, blocks, block_size, heads, dim]`` in host memory (two rows per block
and layer: the gather's cost shows there); on a GPU flash NHD and HND. ``--layouts`` picks others
(``mla``: ``[blocks, block_size, 576]``). Each figure is the median of ``--repeats`` runs; the
copies of one repeat run back to back so they share the machine's state, and each ratio is the
median of the per-repeat ratios.

The reference is a plain contiguous copy of the same bytes with the same parallelism: on the CPU,
torch's ``copy_`` with as many threads as the backend's ``copy_threads`` (each thread count is a
row of the table); on a GPU (used when CUDA is available, or ``--device cuda``), one
device->host copy into the same pinned pool for stores and one host->device copy for loads.
Beside it, the *bare gather* (and scatter): the backend's row copy of the same blocks called
directly, one call for all of them, without the worker's tasks, key checks and bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvconnect.adapters.vllm_translate import layer_entries
from kvconnect.api import EngineInfo, RequestView
from kvconnect.backends.cpu_offload import CpuOffloadScheduler, CpuOffloadWorker
from kvconnect.backends.cpu_offload.copier import CopyHelpers, copy_blocks
from kvconnect.backends.cpu_offload.messages import LoadJob, OffloadStepMetadata, StoreJob
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import BenchmarkError
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, KVLayout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("vllm_cpu", "flash_nhd", "flash_hnd", "mla")
#: What engines keep on each device (vLLM CPU worker; vLLM/SGLang flash attention on GPUs).
DEFAULT_LAYOUTS = {"cpu": ["vllm_cpu", "flash_nhd"], "cuda": ["flash_nhd", "flash_hnd"]}
MLA_LATENT = 576  # kv_lora_rank 512 + rope 64 (DeepSeek)


@dataclass
class FullAttentionSpec:
    """The fields of vLLM's ``FullAttentionSpec`` that :func:`layer_entries` reads."""

    block_size: int
    num_kv_heads: int
    head_size: int
    head_size_v: int


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvconnect bench offload", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=None,
                   help="KV layouts to measure (default: what engines use on the device: "
                        + "; ".join(f"{d}: {' '.join(v)}" for d, v in DEFAULT_LAYOUTS.items()) + ")")
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
    if a.layouts is None:
        a.layouts = DEFAULT_LAYOUTS[a.device]
    if a.device == "cuda":
        a.copy_threads = [1]  # copies are DMA on a stream; threads do not apply
    elif a.copy_threads is None:
        a.copy_threads = sorted({1, min(4, os.cpu_count() or 1)})
    if a.quick:
        a.layers, a.gb, a.repeats = min(a.layers, 4), min(a.gb, 0.05), min(a.repeats, 3)
        a.lookup_stored = [s for s in a.lookup_stored if s <= 10_000] or [1_000]
    return a


def make_caches(layout: str, layers: int, num_blocks: int, block_size: int, heads: int, head_dim: int,
                dtype: torch.dtype, device: str) -> dict[str, tuple[torch.Tensor, KVLayout]]:
    """Random KV caches of ``layout``, described as the engine adapters describe them."""
    out: dict[str, tuple[torch.Tensor, KVLayout]] = {}
    for i in range(layers):
        if layout == "vllm_cpu":
            t = torch.empty((num_blocks, heads, block_size, 2 * head_dim), dtype=dtype, device=device)
        elif layout == "flash_nhd":
            t = torch.empty((2, num_blocks, block_size, heads, head_dim), dtype=dtype, device=device)
        elif layout == "flash_hnd":
            t = torch.empty((2, num_blocks, heads, block_size, head_dim), dtype=dtype, device=device)
        else:
            t = torch.empty((num_blocks, block_size, MLA_LATENT), dtype=dtype, device=device)
        t.view(torch.uint8).random_()
        name = f"layer.{i}"
        if layout == "vllm_cpu":
            spec = FullAttentionSpec(block_size, heads, head_dim, head_dim)
            for entry, view, lay in layer_entries(name, t, spec, 0):
                out[entry] = (view, lay)
        else:
            dims = {"flash_nhd": FLASH_NHD_DIMS, "flash_hnd": FLASH_HND_DIMS, "mla": MLA_DIMS}[layout]
            out[name] = (t, KVLayout.of_tensor(t, dims))
    return out


def _run(worker: CpuOffloadWorker, meta: OffloadStepMetadata, expect: int, timeout: float = 600.0) -> float:
    """Drive one step through the worker and wait until ``expect`` requests reported."""
    t0 = time.perf_counter()
    worker.bind_step_metadata(meta)
    worker.start_load_kv()
    worker.wait_for_save()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    copier = worker._copier
    if copier is not None:  # block until the copies end (an engine does its forward pass meanwhile):
        # a polling loop here would take CPU from the copy threads it times
        copier.wait([t for ts in worker._inflight.values() for t in ts], timeout)
    while True:
        r = worker.get_transfer_results(set())
        if r.failed_recving or r.failed_sending:
            raise BenchmarkError(f"benchmark copy failed: {r}")
        seen |= r.finished_sending | r.finished_recving
        if len(seen) >= expect:
            break
        if time.monotonic() > deadline:
            raise BenchmarkError("benchmark copies did not finish")
        time.sleep(0.001)
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


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _plain_copy(w: CpuOffloadWorker, threads: int, to_engine: bool) -> float:
    """The physical limit: one contiguous copy of the same bytes per piece of engine memory."""
    cuda = w.layers[0].engine.is_cuda
    _sync(cuda)
    t0 = time.perf_counter()
    with _Threads(threads):
        for lc in w.layers:
            assert lc.engine_rows is not None and lc.pool_rows is not None, (
                "benchmark layouts split into rows"
            )
            pool = lc.pool_rows.view(-1)
            engine = lc.engine_rows.view(-1)[: pool.numel()]
            if to_engine:
                engine.copy_(pool, non_blocking=cuda)
            else:
                pool.copy_(engine, non_blocking=cuda)
        _sync(cuda)
    return time.perf_counter() - t0


def _bare(w: CpuOffloadWorker, kind: str, blocks: list[int], helpers: CopyHelpers | None) -> float:
    """The backend's row copy of the same blocks, called directly (one call for all of them)."""
    cuda = w.layers[0].engine.is_cuda
    _sync(cuda)
    t0 = time.perf_counter()
    keep: list = []
    copy_blocks(w.layers, kind, blocks, list(range(len(blocks))), keep, helpers)
    _sync(cuda)
    return time.perf_counter() - t0


def _snapshot(caches: dict[str, tuple[torch.Tensor, KVLayout]], blocks: list[int],
              every: bool = False) -> list[torch.Tensor]:
    """The first entries' (``every``: all entries') bytes of ``blocks``, through each entry's own
    view (not the copy path's rows)."""
    out = []
    for t, lay in list(caches.values())[: None if every else 4]:
        view = t.movedim(lay.dims.index("block"), 0)[blocks]
        out.append(view.contiguous().view(torch.uint8).cpu())
    return out


def verify(w: CpuOffloadWorker, caches: dict[str, tuple[torch.Tensor, KVLayout]], src: list[int],
           dst: list[int], n: int, chunks: list[tuple[str, slice]], keys: list[bytes]) -> None:
    """After the timed runs (whose reference copies overwrite both sides), the same jobs once more,
    untimed, every byte of every entry: blocks ``src`` refilled with fresh random bytes are
    stored, every block refilled again, the slots loaded into ``dst``; each entry's own view of
    ``dst[i]`` must equal its view of ``src[i]`` before the store (independent of the copy path's
    rows). Raises RuntimeError naming the first wrong block."""
    cuda = w.layers[0].engine.is_cuda
    for lc in w.layers:
        assert lc.engine_rows is not None, "benchmark layouts split into rows"
        lc.engine_rows.view(torch.uint8).random_()
    want = _snapshot(caches, src, every=True)
    for kind, ids in (("store", src), ("load", dst)):
        jobs = [
            (StoreJob if kind == "store" else LoadJob)(
                request_id=f"verify-{kind}{rid}", block_ids=ids[s], slots=list(range(n))[s], keys=keys[s]
            )
            for rid, s in chunks
        ]
        meta = OffloadStepMetadata(stores=jobs, closed=[j.request_id for j in jobs]) if kind == "store" else \
            OffloadStepMetadata(loads=jobs)
        _run(w, meta, len(jobs))
        _sync(cuda)
        if kind == "store":
            for lc in w.layers:  # bytes the load must overwrite
                lc.engine_rows.view(torch.uint8).random_()  # type: ignore[union-attr]
    for name, x, y in zip(caches, want, _snapshot(caches, dst, every=True)):
        bad = (x != y).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:
            raise BenchmarkError(
                f"offload benchmark: {len(bad)} of {n} blocks of {name} differ after a store and "
                f"a load (first: block {src[bad[0]]} -> slot {bad[0]} -> block {dst[bad[0]]})"
            )


def bandwidth(a: argparse.Namespace, layout: str, block_size: int) -> list[dict[str, float]]:
    """One row per thread count for ``layout`` at ``block_size`` (the caches are made once)."""
    dtype = DTYPES[a.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = (MLA_LATENT if layout == "mla" else 2 * a.kv_heads * a.head_dim) * block_size * itemsize
    per_block = per_layer * a.layers
    n = max(1, int(a.gb * 1e9 // per_block))
    nb = n + 8
    caches = make_caches(layout, a.layers, nb, block_size, a.kv_heads, a.head_dim, dtype, a.device)
    return [_bandwidth_row(a, caches, n, nb, per_block, block_size, th) | {"layout": layout}
            for th in a.copy_threads]


def _bandwidth_row(a: argparse.Namespace, caches: dict, n: int, nb: int, per_block: int, block_size: int,
                   threads: int) -> dict[str, float]:
    cfg = CpuOffloadConfig(cpu_bytes_to_use=n * per_block, per_rank=True, copy_threads=threads)
    w = CpuOffloadWorker(cfg, EngineInfo("bench", block_sizes=(block_size,)))
    w.register_kv_caches(caches)
    helpers = CopyHelpers(threads - 1) if threads > 1 and a.device == "cpu" else None
    for lc in w.layers:  # fault the pool in before timing
        lc.pool.view(torch.uint8).zero_()
    g = torch.Generator().manual_seed(0)
    src = torch.randperm(nb, generator=g)[:n].tolist()
    dst = torch.randperm(nb, generator=g)[:n].tolist()
    keys = [i.to_bytes(8, "little") for i in range(n)]
    per = a.blocks_per_request
    chunks = [(f"r{j}", slice(j, min(j + per, n))) for j in range(0, n, per)]
    probe = sorted({0, n // 2, n - 1})
    nbytes = n * per_block
    times: dict[str, list[float]] = {k: [] for k in ("store", "load", "out", "in", "gather", "scatter")}
    for rep in range(a.repeats):
        before = _plain_copy(w, threads, to_engine=False)
        want = _snapshot(caches, [src[i] for i in probe])
        stores = [StoreJob(request_id=f"s{rep}{rid}", block_ids=src[s], slots=list(range(n))[s], keys=keys[s])
                  for rid, s in chunks]
        times["store"].append(
            _run(w, OffloadStepMetadata(stores=stores, closed=[j.request_id for j in stores]), len(stores))
        )
        loads = [LoadJob(request_id=f"l{rep}{rid}", block_ids=dst[s], slots=list(range(n))[s], keys=keys[s])
                 for rid, s in chunks]
        times["load"].append(_run(w, OffloadStepMetadata(loads=loads), len(loads)))
        _sync(a.device == "cuda")
        for x, y in zip(want, _snapshot(caches, [dst[i] for i in probe])):  # byte-for-byte round trip
            if not torch.equal(x, y):
                raise BenchmarkError("benchmark round trip corrupted data")
        times["out"].append(min(before, _plain_copy(w, threads, to_engine=False)))  # the faster: strict
        times["in"].append(_plain_copy(w, threads, to_engine=True))
        times["gather"].append(_bare(w, "store", src, helpers))
        times["scatter"].append(_bare(w, "load", dst, helpers))
    verify(w, caches, src, dst, n, chunks, keys)
    runs = sum(lc.plan.rows_per_block for lc in w.layers if lc.plan is not None) / a.layers
    w.shutdown()
    w.layers.clear()  # free the pool now: the worker's copy thread holds it in a cycle until a gc pass
    if helpers is not None:
        helpers.close()
    med = {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    return {
        "threads": threads,
        "block_size": block_size,
        "blocks": n,
        "bytes": nbytes,
        "block_bytes": per_block,
        "runs_per_block_layer": runs,
        "store_gbps": med["store"],
        "load_gbps": med["load"],
        "memcpy_gbps": med["out"],
        "memcpy_load_gbps": med["in"],
        "gather_gbps": med["gather"],
        "scatter_gbps": med["scatter"],
        "verified_bytes": 2 * nbytes,  # by verify(): one more store and load
        # Ratios pair each copy with the reference taken next to it (the machine drifts between repeats).
        "store_ratio": statistics.median(r / t for r, t in zip(times["out"], times["store"])),
        "load_ratio": statistics.median(r / t for r, t in zip(times["in"], times["load"])),
        "gather_ratio": statistics.median(r / t for r, t in zip(times["out"], times["gather"])),
        "scatter_ratio": statistics.median(r / t for r, t in zip(times["in"], times["scatter"])),
    }


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


#: Table columns: (heading, row key, format); shared with the markdown report.
COLUMNS = (
    ("layout", "layout", "{}"),
    ("block", "block_size", "{}"),
    ("threads", "threads", "{}"),
    ("blocks", "blocks", "{}"),
    ("GB", "bytes", "{:.2f}"),
    ("runs/block/layer", "runs_per_block_layer", "{:g}"),
    ("store GB/s", "store_gbps", "{:.2f}"),
    ("load GB/s", "load_gbps", "{:.2f}"),
    ("copy out GB/s", "memcpy_gbps", "{:.2f}"),
    ("copy in GB/s", "memcpy_load_gbps", "{:.2f}"),
    ("bare gather GB/s", "gather_gbps", "{:.2f}"),
    ("bare scatter GB/s", "scatter_gbps", "{:.2f}"),
    ("store/copy", "store_ratio", "{:.2f}"),
    ("load/copy", "load_ratio", "{:.2f}"),
    ("gather/copy", "gather_ratio", "{:.2f}"),
    ("scatter/copy", "scatter_ratio", "{:.2f}"),
)


def cells(row: dict) -> list[str]:
    return [fmt.format(row[key] / 1e9 if key == "bytes" else row[key]) for _, key, fmt in COLUMNS]


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("kvconnect").setLevel(logging.WARNING)
    a = _args(argv)
    rows = [r for lay in a.layouts for bs in a.block_sizes for r in bandwidth(a, lay, bs)]
    lookups = lookup_cost(a)
    first = [r for r in rows if r["layout"] == a.layouts[0] and r["block_size"] == a.block_sizes[0]]
    head = max(first, key=lambda r: r["threads"])
    result = {
        "model": {"layers": a.layers, "kv_heads": a.kv_heads, "head_dim": a.head_dim, "dtype": a.dtype},
        "device": _device_name(a.device),
        "layouts": a.layouts,
        "repeats": a.repeats,
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
    widths = [max(len(h), 7) for h, _, _ in COLUMNS]
    print(" ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths)))
    for v in rows:
        print(" ".join(c.rjust(w) for c, w in zip(cells(v), widths)))
    print("(copy out / copy in: a plain contiguous copy of the same bytes, engine -> pool / pool -> engine, "
          "same thread count; bare gather / scatter: the backend's row copy of the same blocks, called "
          "directly)")
    print(f"\nPrefix lookup ({lookups[0]['prefix_blocks']}-block hit, 16-token blocks)")
    print(f"{'stored blocks':>14} {'lookup us':>10} {'first lookup us':>16}")
    for r in lookups:
        print(f"{r['stored_blocks']:>14} {r['lookup_us']:>10.1f} {r['first_lookup_us']:>16.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
