"""The pure part of ``kvconnect bench serve``: from one level's request results to its figures
(percentiles, throughput, failures, the token-for-token comparison with the single instance), and
those figures as a text table, JSON and markdown. No I/O, no servers: unit-tested on its own.

Definitions follow ``vllm bench serve`` so figures compare with what others publish:

* TTFT: sending the request to the first streamed chunk that carries a token.
* TPOT: per request, ``(e2e - ttft) / (output tokens - 1)`` (requests with more than one token).
* ITL: every gap between consecutive token-carrying chunks, over all requests.
* E2E: sending to the last byte of the response.
* one chunk: completed outputs of several tokens that arrived in one streamed chunk (bunched by a
  busy server or a starved client); TPOT and ITL do not see them.
* requests/s and output tokens/s: completed requests (and their tokens) over the level's wall time.

A request the client hung up on is counted as ``hung_up``, never as a failure, and takes no part
in the latency figures; a failure is a request that ended in an error or missed its deadline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

PERCENTILES = (50, 90, 99)
#: Latency figures in every row, each with P50 / P90 / P99 (and the mean), in milliseconds.
LATENCIES = ("ttft", "tpot", "itl", "e2e")


class ResultLike(Protocol):
    """What a level's results must offer (:class:`kvconnect.testing.load.LoadResult` does)."""

    key: str
    token_ids: list[int] | None
    aborted: bool
    error: str | None
    latency_s: float
    ttft_s: float | None
    itl_s: list[float]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default method, which ``vllm bench serve`` uses); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be within 0..100, got {q}")
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and P50 / P90 / P99 of durations given in seconds, in milliseconds."""
    out: dict[str, float | None] = {"mean": sum(values_s) / len(values_s) * 1e3 if values_s else None}
    for q in PERCENTILES:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else p * 1e3
    return out


@dataclass
class Comparison:
    """Completed outputs held against the reference (the single instance's greedy outputs)."""

    compared: int = 0
    differing: int = 0
    #: Completed, but no reference output exists for that key (reported, never counted as equal).
    unreferenced: int = 0
    #: A few differing keys, for the report.
    examples: list[str] = field(default_factory=list)


def compare(
    results: Iterable[ResultLike], reference: Mapping[str, list[int]], max_examples: int = 5
) -> Comparison:
    """Compare every completed result's token ids with ``reference[key]``."""
    c = Comparison()
    for r in results:
        if r.aborted or r.error is not None:
            continue
        want = reference.get(r.key)
        if want is None:
            c.unreferenced += 1
            continue
        c.compared += 1
        if r.token_ids != want:
            c.differing += 1
            if len(c.examples) < max_examples:
                c.examples.append(r.key)
    return c


def reference_outputs(results: Iterable[ResultLike]) -> dict[str, list[int]]:
    """The outputs of every completed result, by key: what later runs are compared with."""
    return {r.key: list(r.token_ids) for r in results
            if not r.aborted and r.error is None and r.token_ids is not None}


def summarize(results: Sequence[ResultLike], wall_s: float, concurrency: int,
              reference: Mapping[str, list[int]] | None) -> dict[str, Any]:
    """One level's row. ``reference=None`` marks the reference stack itself (nothing compared)."""
    done = [r for r in results if not r.aborted and r.error is None]
    out_tokens = sum(len(r.token_ids or ()) for r in done)
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    tpot = [(r.latency_s - r.ttft_s) / (len(r.token_ids) - 1) for r in done
            if r.ttft_s is not None and r.token_ids and len(r.token_ids) > 1]
    itl = [g for r in done for g in r.itl_s]
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(done),
        "hung_up": sum(r.aborted for r in results),
        "failed": sum(r.error is not None for r in results),
        "wall_s": wall_s,
        "requests_per_s": len(done) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "output_tokens": out_tokens,
        "ttft_ms": distribution_ms(ttft),
        "tpot_ms": distribution_ms(tpot),
        "itl_ms": distribution_ms(itl),
        "e2e_ms": distribution_ms([r.latency_s for r in done]),
        # Outputs of several tokens that reached the client in one chunk: the server (or a starved
        # client) bunched them, so TTFT is the whole request and TPOT / ITL say nothing for them.
        "one_chunk": sum(
            1 for r in done if r.ttft_s is not None and len(r.token_ids or ()) > 1 and not r.itl_s
        ),
        "errors": sorted({r.error for r in results if r.error is not None})[:3],
    }
    if reference is None:
        row["compared"] = row["differing"] = row["unreferenced"] = None
    else:
        c = compare(results, reference)
        row.update(asdict(c))
    return row


def request_record(r: ResultLike, prompt_len: int) -> dict[str, Any]:
    """One request, for ``--per-request`` (finding where a tail comes from)."""
    return {
        "key": r.key,
        "prompt": prompt_len,
        "tokens": len(r.token_ids or ()),
        "hung_up": r.aborted,
        "error": r.error,
        "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1e3,
        "e2e_ms": r.latency_s * 1e3,
    }


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

COLUMNS = ("stack", "conc", "done", "hung up", "failed", "req/s", "out tok/s",
           "TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "ITL p50", "p99",
           "E2E p50", "p90", "p99", "1 chunk", "compared", "differ", "left")


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _n(v: Any) -> str:
    return "ref" if v is None else str(v)


def row_cells(stack: str, r: Mapping[str, Any]) -> list[str]:
    t, p, i, e = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"]
    left = r.get("left_behind")
    return [
        stack,
        str(r["concurrency"]),
        str(r["completed"]),
        str(r["hung_up"]),
        str(r["failed"]),
        f"{r['requests_per_s']:.2f}",
        f"{r['output_tokens_per_s']:.1f}",
        _ms(t["p50"]),
        _ms(t["p90"]),
        _ms(t["p99"]),
        _ms(p["p50"]),
        _ms(p["p90"]),
        _ms(p["p99"]),
        _ms(i["p50"]),
        _ms(i["p99"]),
        _ms(e["p50"]),
        _ms(e["p90"]),
        _ms(e["p99"]),
        str(r.get("one_chunk", "-")),
        _n(r.get("compared")),
        _n(r.get("differing")),
        "-" if left is None else ("none" if not left else "YES"),
    ]


def text_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A fixed-width table (latencies in ms) for the terminal."""
    cells = [list(COLUMNS)] + [row_cells(s, r) for s, r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(c)))
             for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(row_cells(s, r)) + " |" for s, r in rows]
    return "\n".join([head, sep, *body])


def to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=1, sort_keys=True)


def ratios(
    rows_by_stack: Mapping[str, Sequence[Mapping[str, Any]]], num: str, den: str
) -> list[dict[str, Any]]:
    """Per concurrency level both stacks ran: ``num``'s TTFT P50 over ``den``'s, and its output
    throughput over ``den``'s (what the issue's targets are stated in)."""
    by_level = {r["concurrency"]: r for r in rows_by_stack.get(den, ())}
    out = []
    for r in rows_by_stack.get(num, ()):
        d = by_level.get(r["concurrency"])
        if d is None:
            continue
        t_n, t_d = r["ttft_ms"]["p50"], d["ttft_ms"]["p50"]
        x_n, x_d = r["output_tokens_per_s"], d["output_tokens_per_s"]
        out.append({"concurrency": r["concurrency"],
                    "ttft_p50_ratio": t_n / t_d if t_n is not None and t_d else None,
                    "throughput_ratio": x_n / x_d if x_d else None})
    return out


def targets_met(
    rs: Sequence[Mapping[str, Any]], ttft_max: float = 0.5, throughput_min: float = 1.5
) -> dict[str, bool]:
    """The issue's bars on :func:`ratios` output: TTFT P50 ratio at most ``ttft_max`` at every
    level, output throughput ratio at least ``throughput_min`` at the highest level."""
    ttft = bool(rs) and all(x["ttft_p50_ratio"] is not None and x["ttft_p50_ratio"] <= ttft_max for x in rs)
    top = max(rs, key=lambda x: x["concurrency"]) if rs else None
    tput = (
        top is not None and top["throughput_ratio"] is not None and top["throughput_ratio"] >= throughput_min
    )
    return {"ttft": ttft, "throughput": tput}
