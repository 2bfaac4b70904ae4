"""End to end on a GPU: real SGLang servers with ``--disaggregation-transfer-backend kvconnect``.

Needs a CUDA device and a full SGLang install (``pip install kvconnect[sglang]`` on a CUDA
machine; SGLang cannot run a model on CPU from PyPI packages). Skipped everywhere else.

Design:
1. build the tiny random-weight Llama (GQA) locally (``kvconnect.testing.tiny_models``);
2. start a single SGLang instance on it and record greedy outputs for a few prompts;
3. start a prefill instance and a decode instance on the same GPU (each with a third of its
   memory), both with ``--disaggregation-transfer-backend kvconnect``, NIXL over UCX;
4. drive them the way SGLang's PD router does: each request goes to prefill and decode at once,
   carrying the same ``bootstrap_host`` / ``bootstrap_port`` / ``bootstrap_room``;
5. the decode instance's greedy output token ids must equal the single instance's, token for token.
Generation ignores EOS, so every output has exactly ``MAX_NEW`` tokens (an empty or early-stopped
output cannot match by accident), and the single instance's outputs must differ from each other
(a model that says the same thing to every prompt would prove nothing). A random model changes its
output completely when any KV page is wrong, so equality proves every page (and the first-token
metadata row) arrived.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import sys
import urllib.request

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = ["alpha beta gamma delta", "the quick brown fox jumps over", "one two three four five six seven"]
MAX_NEW = 24
START_S = 600.0


def _need_gpu_sglang() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("sglang", reason="SGLang is not installed")
    pytest.importorskip("nixl._api", reason="NIXL is not installed")


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _sglang(name: str, model: str, workdir, port: int, extra: list[str], env: dict | None = None):
    from kvconnect.testing.procs import ServerProcess

    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
            "--port", str(port), "--mem-fraction-static", "0.3", "--disable-cuda-graph", *extra]
    e = dict(os.environ, UCX_NET_DEVICES=os.environ.get("UCX_NET_DEVICES", "all"), **(env or {}))
    return ServerProcess(name=name, argv=argv, env=e, port=port, log_path=workdir / f"{name}.log")


def _greedy(url: str, prompt: str, extra: dict | None = None) -> list[int]:
    """Greedy output token ids: exactly ``MAX_NEW`` of them (EOS ignored)."""
    body = {
        "text": prompt,
        "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True},
        **(extra or {}),
    }
    out = _post(f"{url}/generate", body)
    ids = out.get("output_ids")
    assert isinstance(ids, list) and len(ids) == MAX_NEW, f"{url}: expected {MAX_NEW} output ids, got {out}"
    return ids


def test_kvconnect_pd_matches_a_single_instance_token_for_token(tmp_path):
    _need_gpu_sglang()
    from kvconnect.testing.ports import free_port
    from kvconnect.testing.procs import running
    from kvconnect.testing.tiny_models import build_llama_gqa

    model = str(build_llama_gqa(tmp_path / "model"))
    single = _sglang("single", model, tmp_path, free_port(), [])
    with running(single, timeout_s=START_S):
        want = [_greedy(single.url, p) for p in PROMPTS]
    assert len({tuple(w) for w in want}) == len(PROMPTS), f"the baseline does not vary by prompt: {want}"

    bootstrap = free_port()
    pd = ["--disaggregation-transfer-backend", "kvconnect", "--disaggregation-bootstrap-port", str(bootstrap)]
    prefill = _sglang("prefill", model, tmp_path, free_port(), ["--disaggregation-mode", "prefill", *pd])
    decode = _sglang("decode", model, tmp_path, free_port(), ["--disaggregation-mode", "decode", *pd])
    with running(prefill, decode, timeout_s=START_S), cf.ThreadPoolExecutor(2) as pool:
        got = []
        for p in PROMPTS:
            route = {"bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap,
                     "bootstrap_room": random.randrange(2**63)}
            f_pre = pool.submit(_greedy, prefill.url, p, route)
            f_dec = pool.submit(_greedy, decode.url, p, route)
            f_pre.result(timeout=120)
            got.append(f_dec.result(timeout=120))
    assert got == want
