"""The PNG of ``kvconnect bench serve``: TTFT P50 and P99 (left) and output throughput (right)
against concurrency, one line per stack. Needs matplotlib (the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot(report: Mapping[str, Any], path: Path, labels: Mapping[str, str]) -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("kvconnect bench serve: the plot needs matplotlib (pip install 'kvconnect[bench]'), "
                         "or pass --plot ''") from e
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_x) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, stack in enumerate(report["stacks"]):
        rows = report["rows"][stack]
        conc = [r["concurrency"] for r in rows]
        color = f"C{i}"
        name = labels.get(stack, stack)
        for q, style, face in (("p50", "-", color), ("p99", "--", "none")):
            ys = [r["ttft_ms"][q] for r in rows]
            pts = [(c, y) for c, y in zip(conc, ys) if y is not None]
            if pts:
                ax_t.plot(*zip(*pts), style, marker="o", color=color, markerfacecolor=face,
                          label=f"{name} {q.upper()}")
        ax_x.plot(conc, [r["output_tokens_per_s"] for r in rows], "-", marker="o", color=color, label=name)
    for ax in (ax_t, ax_x):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time to first token (ms)")
    ax_t.set_title("TTFT P50 (solid) and P99 (dashed)")
    ax_x.set_ylabel("output tokens / s")
    ax_x.set_title("output throughput")
    ax_t.legend(fontsize=7)
    ax_x.legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(
        f"kvconnect bench serve: {cfg['requests']} requests per level, model {Path(str(cfg['model'])).name}, "
        f"{report['machine'].get('gpu') or 'CPU'}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
