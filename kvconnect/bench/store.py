"""``kvconnect bench store``: put and get bandwidth of the shared tier (the mooncake backend's worker,
verification included) next to raw ``MooncakeDistributedStore`` zero-copy batch calls
(``batch_put_from`` / ``batch_get_into``) on the same bytes in the same run, and lookup cost
against the number of objects in the store.

It starts its own store (``mooncake_master`` and a memory holder on 127.0.0.1, like the tests),
unless ``--master`` names one. KV caches are vLLM-CPU shaped: per layer ``[blocks, kv_heads,
block_size, 2 * head_dim]``, so one block of one layer is one contiguous run. The raw reference
puts and gets every such run as its own object, in batches of the same bytes as the backend's; the
backend puts one object per block (every layer's run plus a 40-byte verified header). Each figure
is the median of ``--repeats``; within a repeat the two sides' puts run back to back, then their
gets (raw first in even repeats, kvconnect first in odd ones), and each ratio is the median of
the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kvconnect.api import EngineInfo, RequestView
from kvconnect.backends.mooncake import MooncakeScheduler, MooncakeWorker
from kvconnect.backends.mooncake.messages import MooncakeStepMetadata, StoreLoad, StoreSave
from kvconnect.config import MooncakeConfig
from kvconnect.errors import BenchmarkError
from kvconnect.layout import VLLM_CPU_DIMS, KVLayout

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvconnect bench store", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--gb", type=float, default=0.5, help="GB moved per direction per repeat")
    p.add_argument(
        "--batch-objects",
        type=int,
        default=MooncakeConfig(master_server_address="h:1").batch_objects,
        help="blocks per Mooncake batch call (the config's batch_objects)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--staging", choices=("auto", "always"), default="auto",
                   help="the backend's staging option: 'always' moves the (host) KV through the "
                        "staging buffer a GPU deployment uses, to measure its cost")
    p.add_argument("--lookup-stored", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    p.add_argument("--lookup-prefix-blocks", type=int, default=64)
    p.add_argument("--master", default=None, help="host:port of a running master (default: start one)")
    p.add_argument("--metadata-server", default="P2PHANDSHAKE")
    p.add_argument("--quick", action="store_true", help="small sizes, for CI")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.gb, a.repeats = min(a.layers, 4), min(a.gb, 0.05), min(a.repeats, 2)
        a.lookup_stored = [s for s in a.lookup_stored if s <= 1_000] or [1_000]
    return a


def _engine(a: argparse.Namespace, rid: str) -> EngineInfo:
    return EngineInfo(rid, block_sizes=(a.block_size,), model_signature={"bench": a.layers},
                      model_name="bench")


def _drive(w: MooncakeWorker, meta: MooncakeStepMetadata, rid: str, kind: str, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    w.bind_step_metadata(meta)
    w.start_load_kv()
    w.clear_step_metadata()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = w.get_transfer_results(set())
        if kind == "load" and rid in out.finished_recving:
            if out.invalid_block_ids:
                raise BenchmarkError(f"bench load failed: {len(out.invalid_block_ids)} invalid blocks")
            return time.perf_counter() - t0
        if kind == "save" and rid in out.finished_sending:
            if rid in out.failed_sending:
                raise BenchmarkError("bench store failed (is the memory holder large enough?)")
            return time.perf_counter() - t0
        time.sleep(0.0005)
    raise BenchmarkError(f"bench {kind} did not finish in {timeout} s")


def _raw_put(store: Any, keys: list[str], src: list[int], size: int, step: int) -> float:
    """Seconds to put the ``src`` runs: raw zero-copy batch calls."""
    t0 = time.perf_counter()
    for lo in range(0, len(keys), step):
        codes = store.batch_put_from(keys[lo:lo + step], src[lo:lo + step], [size] * len(keys[lo:lo + step]))
        if any(c != 0 for c in codes):
            raise BenchmarkError(f"raw put failed: {sorted(set(codes))[:3]}")
    return time.perf_counter() - t0


def _raw_get(store: Any, keys: list[str], dst: list[int], size: int, step: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(keys), step):
        got = store.batch_get_into(keys[lo:lo + step], dst[lo:lo + step], [size] * len(keys[lo:lo + step]))
        if any(g != size for g in got):
            raise BenchmarkError(f"raw get failed: {sorted(set(got))[:3]}")
    return time.perf_counter() - t0


def _kvc_put(w: MooncakeWorker, src: list[int], keys: list[bytes], rid: str) -> float:
    """Seconds to store blocks ``src`` through the worker (checksums, existence query included)."""
    return _drive(w, MooncakeStepMetadata(saves=[StoreSave(request_id=rid, block_ids=src, keys=keys)],
                                          closed=[rid]), rid, "save")


def _kvc_get(w: MooncakeWorker, caches: list[torch.Tensor], src: list[int], dst: list[int],
             keys: list[bytes], rid: str) -> float:
    """Seconds to load them into ``dst`` (every object verified), then a check of the bytes."""
    load = _drive(
        w, MooncakeStepMetadata(loads=[StoreLoad(request_id=rid, block_ids=dst, keys=keys)]), rid, "load"
    )
    if not all(torch.equal(t[src[0]], t[dst[0]]) and torch.equal(t[src[-1]], t[dst[-1]]) for t in caches):
        raise BenchmarkError("bench: loaded blocks differ from the stored ones")
    return load


def bandwidth(a: argparse.Namespace, cfg: MooncakeConfig) -> list[dict[str, Any]]:
    dt = DTYPES[a.dtype]
    per_layer_block = a.kv_heads * a.block_size * 2 * a.head_dim * torch.finfo(dt).bits // 8
    per_block = per_layer_block * a.layers
    n = max(a.batch_objects, int(a.gb * 1e9 // per_block))
    caches = [torch.randn(2 * n, a.kv_heads, a.block_size, 2 * a.head_dim).to(dt) for _ in range(a.layers)]
    w = MooncakeWorker(cfg, _engine(a, "bench"))
    w.register_kv_caches({f"l{i}": (t, KVLayout.of_tensor(t, VLLM_CPU_DIMS)) for i, t in enumerate(caches)})
    store = w._shared.store  # the raw client, same connection and registered memory
    src, dst = list(range(n)), list(range(n, 2 * n))
    # The raw reference: each contiguous run (block x layer) its own object, batches of equal bytes.
    runs_src = [(t.data_ptr() + b * per_layer_block) for b in src for t in caches]
    runs_dst = [(t.data_ptr() + b * per_layer_block) for b in dst for t in caches]
    step = a.batch_objects * a.layers
    rows = []
    for rep in range(a.repeats):
        keys = [os.urandom(16) for _ in range(n)]
        raw_keys = [f"bench-raw/{rep}/{i}" for i in range(len(runs_src))]
        sides = {
            "put": {"raw": functools.partial(_raw_put, store, raw_keys, runs_src, per_layer_block, step),
                    "kvc": functools.partial(_kvc_put, w, src, keys, f"s{rep}")},
            "get": {"raw": functools.partial(_raw_get, store, raw_keys, runs_dst, per_layer_block, step),
                    "kvc": functools.partial(_kvc_get, w, caches, src, dst, keys, f"l{rep}")},
        }
        # Both sides' puts back to back, then both gets (into zeroed blocks, so a get that moved
        # nothing fails the check); the order alternates between repeats, so a warm-up or a drift
        # in the machine's load favours neither side. The store is emptied after each repeat.
        order = ("raw", "kvc") if rep % 2 == 0 else ("kvc", "raw")
        took: dict[tuple[str, str], float] = {}
        for op in ("put", "get"):
            for side in order:
                if op == "get":
                    for t in caches:
                        t[n:].zero_()
                took[op, side] = sides[op][side]()
        store.remove_all(True)
        raw_put, raw_get, save, load = (
            took["put", "raw"],
            took["get", "raw"],
            took["put", "kvc"],
            took["get", "kvc"],
        )
        nbytes = n * per_block
        rows.append({"repeat": rep, "raw_first": order[0] == "raw", "blocks": n, "bytes": nbytes,
                     "put_gbps": nbytes / save / 1e9, "raw_put_gbps": nbytes / raw_put / 1e9,
                     "get_gbps": nbytes / load / 1e9, "raw_get_gbps": nbytes / raw_get / 1e9})
    w.shutdown()
    del caches
    return rows


def lookup_cost(a: argparse.Namespace, cfg: MooncakeConfig) -> list[dict[str, Any]]:
    """Scheduler lookups (thread hand-off + one batch_is_exist) of a stored prefix, by how many
    objects the store holds, next to the raw batch_is_exist of the same keys."""
    import numpy as np

    bs, prefix = a.block_size, a.lookup_prefix_blocks
    eng = _engine(a, "lookup")
    s = MooncakeScheduler(cfg, eng)
    w = MooncakeWorker(cfg, eng)
    kv = torch.zeros(prefix + 1, 1, bs, 2)
    w.register_kv_caches({"l0": (kv, KVLayout.of_tensor(kv, VLLM_CPU_DIMS))})
    s.set_handshake_metadata({0: w.get_handshake_metadata()})
    store = w._shared.store
    tokens = list(range(prefix * bs + 1))
    keys = s._keys.keys(RequestView("seed", tokens), prefix)
    _drive(
        w,
        MooncakeStepMetadata(
            saves=[StoreSave(request_id="seed", block_ids=list(range(prefix)), keys=keys)], closed=["seed"]
        ),
        "seed",
        "save",
    )
    names = [w.io.prefix + k.hex() for k in keys]
    filler = np.zeros(64, np.uint8)
    store.register_buffer(filler.ctypes.data, filler.nbytes)
    have, rows = 0, []
    for stored in a.lookup_stored:
        while have < stored:
            batch = [f"bench-fill/{i}" for i in range(have, min(stored, have + 2000))]
            store.batch_put_from(batch, [filler.ctypes.data] * len(batch), [64] * len(batch))
            have += len(batch)
        reps = 50
        t0 = time.perf_counter()
        for i in range(reps):
            view = RequestView(f"q{stored}-{i}", tokens)
            while (r := s.get_num_new_matched_tokens(view, 0))[0] is None:
                time.sleep(0.00005)
            assert r[0] == prefix * bs, r
        lookup = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            store.batch_is_exist(names)
        raw = (time.perf_counter() - t0) / reps
        rows.append({"stored_objects": stored, "prefix_blocks": prefix, "lookup_us": lookup * 1e6,
                     "raw_exist_us": raw * 1e6})
    store.remove_all(True)
    w.shutdown()
    s.shutdown()
    return rows


def _summary(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("kvconnect").setLevel(logging.WARNING)
    a = _args(argv)
    store_proc = None
    if a.master is None:
        from kvconnect.testing.mooncake import MooncakeStore

        dt = DTYPES[a.dtype]
        per_block = a.layers * a.kv_heads * a.block_size * 2 * a.head_dim * torch.finfo(dt).bits // 8
        # Both sides' objects at once (puts run back to back), with room to spare: a full store evicts.
        need = 2 * max(a.batch_objects, int(a.gb * 1e9 // per_block)) * per_block + (512 << 20)
        store_proc = MooncakeStore(
            Path(tempfile.mkdtemp(prefix="kvc-bench-store-")), segment_bytes=need
        ).start()
        master, md = store_proc.master_address, store_proc.metadata_server
    else:
        master, md = a.master, a.metadata_server
    cfg = MooncakeConfig(master_server_address=master, metadata_server=md, batch_objects=a.batch_objects,
                         store_timeout_s=600.0, load_timeout_s=600.0, staging=a.staging)
    try:
        rows = bandwidth(a, cfg)
        lookups = lookup_cost(a, cfg)
    finally:
        if store_proc is not None:
            store_proc.stop()
    result = {
        "model": {"layers": a.layers, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                  "block_size": a.block_size, "dtype": a.dtype},
        "device": f"CPU ({os.cpu_count()} cores), TCP over loopback",
        "staging": a.staging,
        "put_gbps": _summary(rows, "put_gbps"), "raw_put_gbps": _summary(rows, "raw_put_gbps"),
        "get_gbps": _summary(rows, "get_gbps"), "raw_get_gbps": _summary(rows, "raw_get_gbps"),
        "put_ratio": statistics.median(r["put_gbps"] / r["raw_put_gbps"] for r in rows),
        "get_ratio": statistics.median(r["get_gbps"] / r["raw_get_gbps"] for r in rows),
        "rows": rows,
        "lookup": lookups,
    }
    if a.json:
        print(json.dumps(result))
        return 0
    r0 = rows[0]
    print(
        f"Shared tier (Mooncake Store) on {result['device']}: {a.layers} layers, {a.kv_heads} KV heads, "
        f"head dim {a.head_dim}, {a.block_size}-token blocks, {a.dtype}; {r0['blocks']} blocks = "
        f"{r0['bytes'] / 1e9:.2f} GB per direction, {a.batch_objects} blocks per call; median of {a.repeats}"
        + ("; KV moved through the staging buffer (staging=always)" if a.staging == "always" else "")
    )
    print(f"{'':>6} {'kvconnect GB/s':>15} {'raw GB/s':>9} {'ratio':>6}")
    print(
        f"{'put':>6} {result['put_gbps']:>15.2f} {result['raw_put_gbps']:>9.2f} {result['put_ratio']:>6.2f}"
    )
    print(
        f"{'get':>6} {result['get_gbps']:>15.2f} {result['raw_get_gbps']:>9.2f} {result['get_ratio']:>6.2f}"
    )
    print("(kvconnect: one object per block, checksummed header, existence query before put; raw: "
          "batch_put_from / batch_get_into of each block x layer run)")
    print(f"\nLookup of a {lookups[0]['prefix_blocks']}-block prefix (scheduler: hand-off to the lookup "
          "thread + one batch_is_exist)")
    print(f"{'stored objects':>15} {'lookup us':>10} {'raw exist us':>13}")
    for r in lookups:
        print(f"{r['stored_objects']:>15} {r['lookup_us']:>10.1f} {r['raw_exist_us']:>13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
