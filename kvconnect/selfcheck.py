"""``kvconnect selfcheck``: prove the installation works on this machine in a few seconds."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable


def _layout() -> str:
    import torch

    from kvconnect.layout import VLLM_CPU_DIMS, KVLayout

    t = torch.arange(4 * 2 * 32 * 8, dtype=torch.float32).reshape(4, 2, 32, 8)
    layout = KVLayout.of_tensor(t, VLLM_CPU_DIMS)
    (off, n), = layout.block_ranges(2)
    raw = t.view(torch.uint8).reshape(-1)[off : off + n]
    assert torch.equal(raw.view(torch.float32).reshape(2, 32, 8), t[2]), "block bytes differ"
    return f"block of {n} bytes located by strides"


def _wire() -> str:
    from kvconnect.metadata import KVTransferParams, decode, encode

    p = KVTransferParams(do_remote_prefill=True, remote_block_ids=[1, 2])
    assert decode(encode(p), KVTransferParams, what="selfcheck") == p
    return "msgspec round trip"


def _side_channel() -> str:
    from kvconnect.handshake import SideChannelClient, SideChannelServer

    with SideChannelServer("127.0.0.1", 0, {"ping": lambda b: b"pong"}, secret="x") as srv:
        c = SideChannelClient(secret="x")
        t0 = time.perf_counter()
        assert c.request("127.0.0.1", srv.port, "ping", timeout_s=5) == b"pong"
        dt = (time.perf_counter() - t0) * 1e3
        c.close()
    return f"authenticated round trip in {dt:.2f} ms"


def _optional(module: str, what: str) -> Callable[[], str]:
    def check() -> str:
        return f"{what}: {'installed' if importlib.util.find_spec(module) else 'not installed'}"

    return check


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("layout", _layout),
    ("wire", _wire),
    ("side channel", _side_channel),
    ("nixl", _optional("nixl_cu12", "NIXL (pip install nixl-cu12 nixl)")),
    ("vllm", _optional("vllm", "vLLM")),
    ("sglang", _optional("sglang", "SGLang")),
]


def run(verbose: bool = True) -> int:
    failed = 0
    for name, check in CHECKS:
        try:
            detail, status = check(), "ok"
        except Exception as e:  # report every failure, then fail the command
            detail, status = f"{type(e).__name__}: {e}", "FAIL"
            failed += 1
        if verbose:
            print(f"{status:4}  {name:13} {detail}")
    return 1 if failed else 0
