#!/usr/bin/env python
"""Raw NIXL READ throughput between two agents on host memory (UCX over loopback).

Reference numbers for kvconnect: how fast NIXL itself moves N blocks of B bytes, as
- one transfer over N prepared per-block descriptors, blocks contiguous on both sides (NIXL
  merges such runs itself),
- the same N descriptors shuffled so nothing can merge (the per-block cost),
- one descriptor covering all N*B bytes,
next to a single numpy copy and a Python loop of per-block copies in one process.

By default the source buffer lives in a spawned peer process (the real P/D case: UCX uses cma);
``--in-process`` puts both agents in this process. Usage:

    UCX_NET_DEVICES=lo python scripts/raw_nixl_probe.py --blocks 1024 --block-kb 256 --repeat 5
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_LOG_LEVEL", "error")
os.environ.setdefault("UCX_MODULES", "^efa")  # kvconnect.ucx_env: without it, a crash at exit on RDMA hosts

POLL_S = 50e-6
DEADLINE_S = 60.0


def _config():
    from nixl_cu12._api import nixl_agent_config

    return nixl_agent_config(enable_prog_thread=False, backends=["UCX"])


def _source_buffer(nbytes: int) -> np.ndarray:
    return np.resize(np.arange(251, dtype=np.uint8), nbytes)  # a pattern worth checking


def _peer_main(conn, nbytes: int, poll_s: float) -> None:
    """Peer process: registers the source buffer, hands out metadata, and progresses its agent."""
    from nixl_cu12._api import nixl_agent

    agent = nixl_agent("probe-src", _config())
    buf = _source_buffer(nbytes)
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    conn.send((agent.get_agent_metadata(), buf.ctypes.data))
    end = time.monotonic() + 3600
    while time.monotonic() < end:
        agent.get_new_notifs()
        if conn.poll(poll_s) and conn.recv() == "stop":
            break


def _wait(agent, handle, progress=None) -> None:
    end = time.monotonic() + DEADLINE_S
    state = agent.check_xfer_state(handle)
    while state == "PROC":
        if time.monotonic() > end:
            raise TimeoutError(f"transfer still PROC after {DEADLINE_S} s")
        if progress is not None:
            progress.get_new_notifs()
        time.sleep(POLL_S)
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"transfer ended {state}")


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--block-kb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--in-process", action="store_true", help="both agents in this process")
    ap.add_argument("--peer-poll-us", type=float, default=200.0, help="peer progress interval")
    args = ap.parse_args()

    from nixl_cu12._api import nixl_agent

    n, bs = args.blocks, args.block_kb * 1024
    total = n * bs
    peer_proc = conn = src_agent = None
    if args.in_process:
        src_agent = nixl_agent("probe-src", _config())
        src = _source_buffer(total)
        src_agent.register_memory([(src.ctypes.data, total, 0, "")], "DRAM")
        md, raddr = src_agent.get_agent_metadata(), src.ctypes.data
    else:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        peer_proc = ctx.Process(target=_peer_main, args=(child, total, args.peer_poll_us * 1e-6), daemon=True)
        peer_proc.start()
        if not conn.poll(120):
            raise TimeoutError("peer did not start")
        md, raddr = conn.recv()
        src = _source_buffer(total)  # only to verify against

    dst_agent = nixl_agent("probe-dst", _config())
    dst = np.zeros(total, dtype=np.uint8)
    dst_agent.register_memory([(dst.ctypes.data, total, 0, "")], "DRAM")
    dst_agent.add_remote_agent(md)

    t0 = time.perf_counter()
    local_blocks = dst_agent.prep_xfer_dlist(
        "", [(dst.ctypes.data + i * bs, bs, 0) for i in range(n)], "DRAM"
    )
    remote_blocks = dst_agent.prep_xfer_dlist(
        "probe-src", [(raddr + i * bs, bs, 0) for i in range(n)], "DRAM"
    )
    prep_blocks_s = time.perf_counter() - t0
    local_one = dst_agent.prep_xfer_dlist("", [(dst.ctypes.data, total, 0)], "DRAM")
    remote_one = dst_agent.prep_xfer_dlist("probe-src", [(raddr, total, 0)], "DRAM")

    ordered = np.arange(n, dtype=np.int32)
    shuffled = np.random.default_rng(0).permutation(n).astype(np.int32)
    one = np.zeros(1, np.int32)
    cases = {  # label: (local handle, local indices, remote handle, remote indices, bytes moved)
        f"{n} blocks, contiguous (NIXL merges)": (local_blocks, ordered, remote_blocks, ordered, total),
        f"{n} blocks, shuffled (no merge)": (local_blocks, shuffled, remote_blocks, shuffled, total),
        "1 merged descriptor of all blocks": (local_one, one, remote_one, one, total),
        "1 block alone (latency)": (local_blocks, one, remote_blocks, one, bs),
    }
    progress = src_agent if args.in_process else None
    print(
        f"READ {n} x {bs // 1024} KiB = {total / 2**20:.0f} MiB, "
        f"{'in-process' if args.in_process else 'two processes'}, {args.repeat} runs; "
        f"prep of both {n}-block lists: {prep_blocks_s * 1e3:.1f} ms"
    )
    # The first transfer also sets up the connection: time it apart, and keep it out of the runs.
    t0 = time.perf_counter()
    h = dst_agent.make_prepped_xfer("READ", local_blocks, one, remote_blocks, one)
    dst_agent.transfer(h)
    _wait(dst_agent, h, progress)
    dst_agent.release_xfer_handle(h)
    print(
        f"first transfer, one block (connection set-up included): {(time.perf_counter() - t0) * 1e3:.1f} ms"
    )
    print(
        f"{'case':38s} {'make ms':>8s} {'post ms':>8s} {'post+wait ms':>13s} {'GB/s med':>9s} "
        f"{'GB/s best':>10s}"
    )
    for label, (lh, li, rh, ri, nbytes) in cases.items():
        make_ms, post_ms, xfer_s = [], [], []
        for _ in range(args.repeat):
            dst[:nbytes] = 0
            t0 = time.perf_counter()
            h = dst_agent.make_prepped_xfer("READ", lh, li, rh, ri)
            t1 = time.perf_counter()
            dst_agent.transfer(h)  # over cma the copy itself may run inside this call
            t2 = time.perf_counter()
            _wait(dst_agent, h, progress)
            t3 = time.perf_counter()
            dst_agent.release_xfer_handle(h)
            make_ms.append((t1 - t0) * 1e3)
            post_ms.append((t2 - t1) * 1e3)
            xfer_s.append(t3 - t1)
            if not np.array_equal(dst[:nbytes], src[:nbytes]):
                raise RuntimeError(f"{label}: bytes differ after READ")
        med = statistics.median(xfer_s)
        print(
            f"{label:38s} {statistics.median(make_ms):8.3f} {statistics.median(post_ms):8.3f} "
            f"{med * 1e3:13.3f} {_gbps(nbytes, med):9.2f} {_gbps(nbytes, min(xfer_s)):10.2f}"
        )

    copy_s, loop_s = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            dst[i * bs : (i + 1) * bs] = src[i * bs : (i + 1) * bs]
        loop_s.append(time.perf_counter() - t0)
    for label, xs in (
        ("numpy: one copy, same process", copy_s),
        (f"numpy: loop of {n} block copies", loop_s),
    ):
        med = statistics.median(xs)
        print(
            f"{label:38s} {'':8s} {'':8s} {med * 1e3:13.3f} {_gbps(total, med):9.2f} "
            f"{_gbps(total, min(xs)):10.2f}"
        )

    if peer_proc is not None:
        conn.send("stop")
        peer_proc.join(10)
        if peer_proc.is_alive():
            peer_proc.kill()


if __name__ == "__main__":
    main()
