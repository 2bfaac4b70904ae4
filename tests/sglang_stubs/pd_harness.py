"""Child-process side of the SGLang P/D integration tests: one SGLang "rank" (prefill or decode)
built from SGLang's real runtime context, KVArgs and kvconnect's classes as ``get_kv_class``
returns them, with host-memory KV buffers, driven by commands from the test process.

Commands (``inq``) and events (``outq``) are plain tuples. Every wait has a deadline; the state
machine is polled the way SGLang's schedulers poll it (``poll()`` in a loop, a short sleep between).
"""

from __future__ import annotations

import ctypes
import os
import queue
import time
import traceback

import numpy as np

NUM_LAYERS = 2
NUM_PAGES = 64
PAGE_SIZE = 4
HEADS = 2
HEAD_DIM = 8
AUX_ROWS = 8
STEP_S = 0.002


def kv_buffers(seed: int | None):
    """K and V buffer per layer, ``[pages, page_size, heads, dim]`` float32; random when seeded."""
    import torch

    g = torch.Generator().manual_seed(seed) if seed is not None else None
    bufs = []
    for _ in range(2 * NUM_LAYERS):
        shape = (NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM)
        bufs.append(torch.randn(shape, generator=g) if g is not None else torch.zeros(shape))
    return bufs


def aux_buffers(seed: int | None):
    import torch

    out = torch.zeros((AUX_ROWS, 16), dtype=torch.int32)
    room = torch.zeros((AUX_ROWS, 1), dtype=torch.int64)
    if seed is not None:
        out.copy_(torch.arange(AUX_ROWS * 16, dtype=torch.int32).reshape(AUX_ROWS, 16) + seed)
        room.fill_(seed)
    return [out, room]


def kv_args(kv, aux, *, is_prefill: bool):
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    args = get_kv_class(TransferBackend("kvconnect"), KVClassType.KVARGS)()
    args.engine_rank = 0
    args.kv_data_ptrs = [t.data_ptr() for t in kv]
    args.kv_data_lens = [t.nbytes for t in kv]
    args.kv_item_lens = [t[0].nbytes for t in kv]
    args.kv_layer_ids = [i // 2 for i in range(len(kv))]
    args.aux_data_ptrs = [t.data_ptr() for t in aux]
    args.aux_data_lens = [t.nbytes for t in aux]
    args.aux_item_lens = [t[0].nbytes for t in aux]
    args.kv_cache_dtype_str = "float32"
    args.kv_layout = None
    args.state_types = []
    args.state_data_ptrs, args.state_data_lens, args.state_item_lens = [], [], []
    args.state_layer_ids, args.state_dim_per_tensor, args.state_slice_outer_counts = [], [], []
    args.state_conv_shard_groups = []
    args.swa_kv_cache_layout = None
    args.is_hybrid_mla_backend = False
    args.ib_device = None
    args.gpu_id = 0
    args.kv_head_num = HEADS
    args.total_kv_head_num = HEADS
    args.page_size = PAGE_SIZE
    args.system_dp_rank = 0
    args.rust_http_port = None
    args.pp_rank = 0
    args.prefill_start_layer = 0
    args.prefill_end_layer = NUM_LAYERS
    args.mla_compression_ratios = None
    args.num_draft_entries = 0
    return args


def _publish(role: str, port: int) -> None:
    from sglang.srt.runtime_context import get_context, get_parallel

    get_context().override_server_args(
        host="127.0.0.1",
        device="cpu",
        disaggregation_mode=role,
        disaggregation_transfer_backend="kvconnect",
        disaggregation_bootstrap_port=port,
    ).install()
    get_parallel().override_permanently(
        attn_tp_rank=0, attn_cp_rank=0, attn_dcp_rank=0, attn_dp_rank=0, dp_rank=0, pp_group=None
    )


def serve(role: str, port: int, env: dict, inq, outq, seed: int = 7) -> None:
    """Child process main: build one rank, then run commands until ``stop``."""
    try:
        os.environ.update(env)
        from tests.sglang_stubs import import_sglang

        import_sglang()
        from kvconnect.adapters.sglang import register

        register()
        _publish(role, port)
        from sglang.srt.disaggregation.utils import (
            DisaggregationMode,
            KVClassType,
            TransferBackend,
            get_kv_class,
        )

        backend = TransferBackend("kvconnect")
        manager_cls = get_kv_class(backend, KVClassType.MANAGER)
        server = None
        if role == "prefill":
            server = get_kv_class(backend, KVClassType.BOOTSTRAP_SERVER)(host="127.0.0.1", port=port)
        prefill = role == "prefill"
        kv = kv_buffers(seed if prefill else None)
        aux = aux_buffers(seed if prefill else None)
        mode = DisaggregationMode.PREFILL if prefill else DisaggregationMode.DECODE
        mgr = manager_cls(kv_args(kv, aux, is_prefill=prefill), mode, None, False)
        outq.put(("ready", role, os.getpid(), [c.__name__ for c in (manager_cls, type(server))]))
        while True:
            cmd = inq.get(timeout=120)
            if cmd[0] == "stop":
                break
            if cmd[0] == "prefill":
                outq.put(
                    _run_prefill(get_kv_class(backend, KVClassType.SENDER), mgr, port, inq, outq, *cmd[1:])
                )
            elif cmd[0] == "decode":
                outq.put(
                    _run_decode(
                        get_kv_class(backend, KVClassType.RECEIVER), mgr, port, kv, aux, seed, outq, *cmd[1:]
                    )
                )
        mgr.close()
        if server is not None:
            server.close()
        outq.put(("stopped", role))
    except BaseException:
        outq.put(("error", role, traceback.format_exc()))
        raise  # and exit non-zero: the test checks every rank's exit code


def _poll_until(obj, want, deadline, seen):
    from sglang.srt.disaggregation.base.conn import KVPoll

    while time.monotonic() < deadline:
        st = int(obj.poll())
        if not seen or seen[-1] != st:
            seen.append(st)
        if st in want or st == KVPoll.Failed:
            return st
        time.sleep(STEP_S)
    return None


def _reason(obj) -> str:
    try:
        obj.failure_exception()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def _run_prefill(
    sender_cls,
    mgr,
    port,
    inq,
    outq,
    room,
    src_pages,
    aux_index,
    chunks,
    go_q_timeout,
    gate=False,
    announce=False,
    corrupt=False,
):
    """Bootstrap -> wait for decode's pages -> (with ``gate``: report ``prefill-waiting`` and wait
    for ``go``) -> send in ``chunks`` (then report ``prefill-sent``) -> poll to the end. With
    ``announce``, report ``prefill-polled`` after the sender's first poll (a test then starts the
    decode side, so the first state seen cannot already be past Bootstrapping). With ``corrupt``,
    once the lease's checksums are served, flip one byte of the second page in buffer 1 and report
    ``prefill-corrupted``."""
    from sglang.srt.disaggregation.base.conn import KVPoll

    seen: list[int] = []
    sender = sender_cls(mgr, f"127.0.0.1:{port}", room)
    if announce:
        seen.append(int(sender.poll()))
        outq.put(("prefill-polled", room))
    deadline = time.monotonic() + go_q_timeout
    st = _poll_until(sender, {KVPoll.WaitingForInput}, deadline, seen)
    if st != KVPoll.WaitingForInput:
        return (
            "prefill-done",
            room,
            seen,
            st,
            _reason(sender) if st == KVPoll.Failed else "no WaitingForInput",
        )
    if gate:
        outq.put(("prefill-waiting", room))
        inq.get(timeout=go_q_timeout)
    pages = np.asarray(src_pages, dtype=np.int32)
    sender.init(len(pages), aux_index)
    for part in np.array_split(pages, chunks):
        sender.send(part)
    outq.put(("prefill-sent", room))
    if corrupt:
        _wait_for_checksums(mgr, room, go_q_timeout)
        t = mgr.kv_args
        addr = t.kv_data_ptrs[1] + int(src_pages[1]) * t.kv_item_lens[1] + 5
        ctypes.c_ubyte.from_address(addr).value ^= 0x20
        outq.put(("prefill-corrupted", room))
    st = _poll_until(sender, {KVPoll.Success}, time.monotonic() + go_q_timeout, seen)
    reason = _reason(sender) if st == KVPoll.Failed else ""
    if st == KVPoll.Success:
        sender.clear()
    return ("prefill-done", room, seen, st, reason)


def _wait_for_checksums(mgr, room, timeout):
    """Until the prefill rank serves the checksums of ``room``'s lease on its side channel."""
    from kvconnect.adapters.sglang.wire import lease_id
    from kvconnect.errors import KVConnectError
    from kvconnect.handshake import SideChannelClient
    from kvconnect.metadata import encode
    from kvconnect.pd.wire import ChecksumRequest

    (agent,) = mgr.transfer_infos[room]
    body = encode(ChecksumRequest(request_id=lease_id(room, agent)))
    client = SideChannelClient(mgr.cfg.secret)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                client.request(mgr.link.host, mgr.link.port, "checksums", body, timeout_s=2.0)
                return
            except KVConnectError:
                time.sleep(0.01)
    finally:
        client.close()
    raise TimeoutError(f"room {room}: checksums never served")


def _run_decode(receiver_cls, mgr, port, kv, aux, seed, outq, room, src_pages, dst_pages, aux_index, timeout):
    from sglang.srt.disaggregation.base.conn import KVPoll

    seen: list[int] = []
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not mgr.try_ensure_parallel_info(addr):
        if time.monotonic() > deadline:
            return ("decode-done", room, seen, None, "prefill parallel info never arrived", False)
        time.sleep(0.05)
    recv = receiver_cls(mgr, addr, room)
    recv.init(0)
    st = _poll_until(recv, {KVPoll.WaitingForInput}, deadline, seen)
    if st != KVPoll.WaitingForInput:
        return ("decode-done", room, seen, st, _reason(recv), False)
    recv.send_metadata(np.asarray(dst_pages, dtype=np.int32), aux_index)
    outq.put(("decode-metadata-sent", room))
    st = _poll_until(recv, {KVPoll.Success}, time.monotonic() + timeout, seen)
    if st != KVPoll.Success:
        return ("decode-done", room, seen, st, _reason(recv), False)
    expect_kv = kv_buffers(seed)
    expect_aux = aux_buffers(seed)
    src, dst = list(src_pages), list(dst_pages)
    ok = all(
        kv[b][dst].numpy().tobytes() == expect_kv[b][src].numpy().tobytes() for b in range(len(kv))
    ) and all(
        aux[i][aux_index].numpy().tobytes() == expect_aux[i][aux_index].numpy().tobytes()
        for i in range(len(aux))
    )
    untouched = [p for p in range(NUM_PAGES) if p not in set(dst)]
    ok = ok and all(not kv[b][untouched].any() for b in range(len(kv)))
    recv.clear()
    return ("decode-done", room, seen, st, "", ok)


def expect(outq, kind, timeout):
    """The next event of ``kind`` (errors from a child raise here)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {kind!r} event within {timeout}s")
        try:
            ev = outq.get(timeout=left)
        except queue.Empty:
            continue
        if ev[0] == "error":
            raise AssertionError(f"{ev[1]} child failed:\n{ev[2]}")
        if ev[0] == kind:
            return ev
