"""The P/D core over real NIXL between two processes, with the KV in GPU memory: VRAM to VRAM and
VRAM to host, for the flash NHD and HND layouts and MLA, with block-size mismatches and TP
splits, pull and push. Every cache byte is random; every transferred byte is compared.

The same cases run host to host (DRAM, UCX over loopback) on every machine: that variant is an
integration test and needs no GPU; the device variants are ``gpu`` tests, skipped without CUDA.
Each producer and consumer engine runs in a spawned child (``tests/integration/nixl_procs.py``).
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from kvconnect.backends.nixl import load_nixl
from kvconnect.errors import BackendUnavailableError
from tests.integration.nixl_procs import spawn_children

#: (producer device, consumer device)
PLACEMENTS = [
    pytest.param(("cpu", "cpu"), marks=pytest.mark.integration, id="host-to-host"),
    pytest.param(("cuda", "cuda"), marks=pytest.mark.gpu, id="vram-to-vram"),
    pytest.param(("cuda", "cpu"), marks=pytest.mark.gpu, id="vram-to-host"),
]

#: (producer spec, consumer spec): pd_harness.Engine fields.
CASES = {
    "nhd-pull-bs16-to-32-checksums": (
        {"kind": "flash", "options": {"verify_checksums": True}},
        {"kind": "flash", "block_size": 32, "options": {"verify_checksums": True}},
    ),
    "nhd-push-tp2-to-tp1": (
        {"kind": "flash", "tp": 2, "mode": "push"},
        {"kind": "flash", "tp": 1, "mode": "push"},
    ),
    "hnd-pull-tp1-to-tp2-bs32-to-16": ({"kind": "hnd", "block_size": 32}, {"kind": "hnd", "tp": 2}),
    "hnd-push-tp2-to-tp1-bs16-to-32": (
        {"kind": "hnd", "tp": 2, "mode": "push"},
        {"kind": "hnd", "block_size": 32, "mode": "push"},
    ),
    "mla-pull-tp1-to-tp2-bs32-to-16": ({"kind": "mla", "block_size": 32}, {"kind": "mla", "tp": 2}),
    "mla-push-tp1-to-tp2-bs16-to-32": (
        {"kind": "mla", "mode": "push"},
        {"kind": "mla", "tp": 2, "block_size": 32, "mode": "push"},
    ),
}

TOKENS = 70  # not a multiple of any block size: the last block of each side is partial


@pytest.fixture(scope="module", params=PLACEMENTS)
def placed_pair(request):
    """One producer process and one consumer process hosting an engine per case, their KV caches
    on the placement's devices."""
    p_dev, d_dev = request.param
    try:
        load_nixl()
    except BackendUnavailableError as e:
        pytest.skip(f"real NIXL is not installed: {e}")
    ctx = mp.get_context("spawn")
    P, D = spawn_children(ctx, ("prefill", {k: {**v[0], "device": p_dev} for k, v in CASES.items()}),
                          ("decode", {k: {**v[1], "device": d_dev} for k, v in CASES.items()}))
    yield P, D
    P.close()
    D.close()


@pytest.mark.parametrize("case", list(CASES))
def test_every_kv_byte_arrives_on_the_consumers_device(placed_pair, case):
    P, D = placed_pair
    p_spec, d_spec = CASES[case]
    p_bs, d_bs = p_spec.get("block_size", 16), d_spec.get("block_size", 16)
    p_ids = [[3, 9, 4, 10, 12][: -(-TOKENS // p_bs)]]
    d_ids = [[7, 2, 15, 16, 5][: -(-TOKENS // d_bs)]]
    P.send("prefill", case, f"p-{case}", TOKENS, p_ids)
    _, _, params, dump = P.expect("params", f"p-{case}")
    D.send("decode", case, f"d-{case}", TOKENS, params, d_ids)
    ev = D.expect("recv", f"d-{case}")
    assert ev[2] is False, f"load failed: {ev}"
    P.expect("sent", f"p-{case}")
    D.send("check", case, dump, p_spec, p_ids, d_ids, 0, TOKENS)
    assert D.expect("checked", case)[2] == "ok"
