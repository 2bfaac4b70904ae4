"""Shared pieces of the kvconnect e2e sweep: kv-transfer-configs, the request set, comparisons,
direct prefill/decode calls, and a small server group that always tears down."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kvconnect.testing import servers as S
from kvconnect.testing import tiny_models as T

MAX_TOKENS = 16
BLOCK = 32

#: Token-id prompts (exact lengths): shorter than one block, exactly two blocks of 32 (one of 64),
#: and ragged (3 full blocks of 32 plus a tail).
PROMPT_LENGTHS = {"short": 7, "exact64": 64, "ragged113": 113}
#: Chat prompts (texts, the chat template adds the rest): a short and a long one.
CHAT_PROMPTS = {"short": T.pseudo_prompt(201, 4), "long": T.pseudo_prompt(202, 60)}
#: The short prompt used for latency figures (the harness smoke test's "medium" one).
LATENCY_PROMPT = T.pseudo_prompt(102, 40)


def prompt_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(8, T.VOCAB_SIZE) for _ in range(n)]


def deps_missing() -> list[str]:
    """What the kvconnect e2e tier needs and this environment lacks."""
    return [m for m in ("vllm", "nixl", "vllm_router") if importlib.util.find_spec(m) is None]


PROMPTS = {name: prompt_ids(1000 + n, n) for name, n in PROMPT_LENGTHS.items()}

#: More prompts whose single-instance outputs other modules need (offload, composition, failure).
SHARED_PREFIX = prompt_ids(3000, 256)
EXTRA_PROMPTS = {
    "prefix+a": SHARED_PREFIX + prompt_ids(3001, 20),
    "prefix+b": SHARED_PREFIX + prompt_ids(3002, 37),
    "repeat": prompt_ids(3003, 200),
    "killed-recompute": prompt_ids(3004, 150),
}


def extras(url: str) -> dict[str, list[int]]:
    return {k: S.completion(url, p, max_tokens=MAX_TOKENS).token_ids for k, p in EXTRA_PROMPTS.items()}


# Cached single-instance outputs, per model, shared by the modules of one session.
BASELINES: dict[str, dict[str, list[int]]] = {}


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------

def nixl(port: int, mode: str = "pull", **kw: Any) -> dict[str, Any]:
    return {"backend": "nixl", "mode": mode, "side_channel_port": port, **kw}


def offload(nbytes: int = 512 * 2**20, **kw: Any) -> dict[str, Any]:
    return {"backend": "cpu_offload", "cpu_bytes_to_use": nbytes, **kw}


def kvconnect(
    *backends: Mapping[str, Any], policy: str | None = None, module_path: bool = False
) -> dict[str, Any]:
    """A ``--kv-transfer-config`` selecting kvconnect by its plugin name (or module path)."""
    extra = dict(backends[0]) if len(backends) == 1 else {"backends": [dict(b) for b in backends]}
    cfg: dict[str, Any] = {
        "kv_connector": "KVConnect",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }
    if module_path:
        cfg["kv_connector_module_path"] = "kvconnect.adapters.vllm"
    if policy:
        cfg["kv_load_failure_policy"] = policy
    return cfg


def server(model: Path, workdir: Path, name: str, cpus: str, kv: Mapping[str, Any] | None = None,
           block_size: int | None = BLOCK, env: Mapping[str, str] | None = None,
           args: Iterable[str] = ()) -> S.ServerProcess:
    e = dict(S.NIXL_CPU_ENV) if kv else {}
    e.update(env or {})
    return S.vllm_server(model, workdir, name=name, cpus=cpus, kv_transfer_config=kv, block_size=block_size,
                         extra_env=e, extra_args=list(args))


class Group(contextlib.ExitStack):
    """Servers started together and stopped together (also on any failure)."""

    def start(self, *servers: S.ServerProcess, wait: bool = True) -> None:
        for s in servers:
            s.start()
            self.callback(s.stop)
        if wait:
            S.wait_all_ready(servers)

    def router(
        self, prefill: S.ServerProcess, decode: S.ServerProcess, workdir: Path, name: str
    ) -> S.ServerProcess:
        r = S.router_server(prefill.url, decode.url, workdir, name=name).start()
        self.callback(r.stop)
        r.wait_ready(time.monotonic() + S.ROUTER_START_DEADLINE_S)
        return r


# ----------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------

def request_set(url: str, max_tokens: int = MAX_TOKENS, small: bool = False) -> dict[str, list[int]]:
    """Greedy completions (plain and streamed) for every prompt length, and chat (plain and
    streamed). ``small``: each prompt length once (plain) and one streamed chat, for slow models."""
    out: dict[str, list[int]] = {}
    for name, ids in PROMPTS.items():
        out[f"cmpl/{name}"] = S.completion(url, ids, max_tokens=max_tokens).token_ids
        if not small:
            out[f"cmpl-stream/{name}"] = S.completion(url, ids, max_tokens=max_tokens, stream=True).token_ids
    for name, text in CHAT_PROMPTS.items():
        if not small:
            out[f"chat/{name}"] = S.chat(url, text, max_tokens=max_tokens).token_ids
        if not small or name == "long":
            out[f"chat-stream/{name}"] = S.chat(url, text, max_tokens=max_tokens, stream=True).token_ids
    return out


def mismatches(got: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any]:
    return {k: {"got": got.get(k), "want": want[k]} for k in want if got.get(k) != want[k]}


def assert_same(got: Mapping[str, Any], want: Mapping[str, Any], what: str, *logs: S.ServerProcess) -> None:
    bad = mismatches(got, want)
    if bad:
        tails = "\n".join(s.log_tail(25) for s in logs)
        raise AssertionError(f"{what}: {len(bad)}/{len(want)} outputs differ: {json.dumps(bad)}\n{tails}")


def counter(url: str, name: str, **labels: str) -> float:
    return S.metric_value(S.get_metrics(url), name, **labels)


def kvc_stat(url: str, stat: str) -> float:
    """A kvconnect counter from ``/metrics`` (``vllm:kvconnect_total{stat=...}``)."""
    return counter(url, "vllm:kvconnect", stat=stat)


def kvc_stat_before(url: str, stat: str) -> float:
    """A kvconnect counter read *before* the step under test. A stat this server has not
    exposed yet has counted nothing (kvconnect reports a stat from its first event on): 0. The
    read after the step uses :func:`kvc_stat`, which raises when the stat is missing, so a renamed
    stat still fails the test."""
    try:
        return kvc_stat(url, stat)
    except S.MetricMissing:
        return 0.0


def prefill_direct(prefill_url: str, prompt: Any, timeout: float = 60.0) -> dict[str, Any]:
    """What a router does first: the prompt to the prefill instance with ``max_tokens=1`` and
    ``do_remote_decode``; returns the ``kv_transfer_params`` for the decode instance."""
    body = {
        "model": S.DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                               "remote_block_ids": None, "remote_host": None, "remote_port": None},
    }
    r = S.post_json(prefill_url.rstrip("/") + "/v1/completions", body, timeout=timeout)
    params = r.get("kv_transfer_params")
    assert params and params.get("do_remote_prefill"), f"prefill returned no transfer params: {r}"
    return params


def decode_direct(
    decode_url: str, prompt: Any, params: Mapping[str, Any], timeout: float = 60.0
) -> S.Generation:
    return S.completion(decode_url, prompt, max_tokens=MAX_TOKENS, extra={"kv_transfer_params": dict(params)},
                        timeout=timeout)


def best_latency(fn, n: int = 5) -> float:
    """Minimum of ``n`` timed calls (the noise here is all on the slow side)."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def note(request, text: str) -> None:
    """A detail for the sweep table (and the junit properties)."""
    request.node.user_properties.append(("sweep", text))
    print(f"\n[{request.node.name}] {text}")
