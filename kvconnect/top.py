"""``kvconnect top URL...``: a live terminal view of running vLLM servers, read from ``/metrics``.

Per server: prompt tokens served by each cache tier (vLLM's hits by source: device, host (the
CPU tier), p2p (P/D transfer), ...), the engine's wait for loads, what each
storage tier holds, and per backend and direction the transfers done, transfers per second,
P50 / P99 transfer time (from kvconnect's histograms: over the last refresh interval once there
is one, else since start) and failures. ``--once`` prints one snapshot (rates need two, so none).

Parsing and rendering are pure functions of the ``/metrics`` text (:func:`parse`, :func:`render`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

#: A kvconnect counter whose stat name ends with one of these counts a failure.
FAILURE_SUFFIXES = ("failed", "failures", "mismatches", "expired", "rejected")
_KVC = "vllm:kvconnect"
_SECONDS = "vllm:kvconnect_transfer_seconds"
_BYTES = "vllm:kvconnect_transfer_bytes"
_WAIT = "vllm:kvconnect_load_wait_seconds"
_TIER = "vllm:kvconnect_tier_"
_BY_SOURCE = "vllm:prompt_tokens_cached_by_source"
#: Older vLLMs have no hits by source: device and external hit counters instead.
_HITS = {"device": "vllm:prefix_cache_hits", "external": "vllm:external_prefix_cache_hits"}


@dataclass
class Hist:
    """A Prometheus histogram summed over engines: cumulative counts per upper bound."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    sum: float = 0.0

    def minus(self, old: Hist | None) -> Hist:
        if old is None:
            return self
        return Hist({le: c - old.buckets.get(le, 0.0) for le, c in self.buckets.items()},
                    self.count - old.count, self.sum - old.sum)

    def quantile(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear within the bucket holding rank ``q*count``;
        the highest finite bound when it falls in the ``+Inf`` bucket; None when empty."""
        if self.count <= 0:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            c = self.buckets[le]
            if c >= rank:
                if math.isinf(le):
                    return lower
                inside = c - below
                return lower + (le - lower) * ((rank - below) / inside if inside > 0 else 1.0)
            lower, below = le, c
        return lower


@dataclass
class Snapshot:
    t: float
    #: kvconnect counters by stat (``backend.counter``)
    counters: dict[str, float] = field(default_factory=dict)
    #: (backend, direction) -> transfer-time histogram; bytes moved
    seconds: dict[tuple[str, str], Hist] = field(default_factory=dict)
    nbytes: dict[tuple[str, str], float] = field(default_factory=dict)
    load_wait: Hist = field(default_factory=Hist)
    #: (backend, gauge) -> value
    gauges: dict[tuple[str, str], float] = field(default_factory=dict)
    #: prompt tokens served from each cache tier (vLLM's sources: ``device``, ``host``, ``p2p``,
    #: ...; or ``device`` / ``external`` where vLLM does not split them)
    hits: dict[str, float] = field(default_factory=dict)


def _hist(table: dict, key: tuple) -> Hist:
    h = table.get(key)
    if h is None:
        h = table[key] = Hist()
    return h


def parse(text: str, t: float | None = None) -> Snapshot:
    """One server's ``/metrics`` text; every value summed over engines."""
    snap = Snapshot(time.monotonic() if t is None else t)
    hits_names = {v: k for k, v in _HITS.items()}
    by_source: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            lab, v = s.labels, s.value
            if fam.name == _KVC and s.name == _KVC + "_total":
                snap.counters[lab["stat"]] = snap.counters.get(lab["stat"], 0.0) + v
            elif fam.name in (_SECONDS, _WAIT):
                h = (
                    _hist(snap.seconds, (lab["backend"], lab["direction"]))
                    if fam.name == _SECONDS
                    else snap.load_wait
                )
                if s.name.endswith("_bucket"):
                    le = float(lab["le"])
                    h.buckets[le] = h.buckets.get(le, 0.0) + v
                elif s.name.endswith("_count"):
                    h.count += v
                elif s.name.endswith("_sum"):
                    h.sum += v
            elif fam.name == _BYTES and s.name.endswith("_sum"):
                key = (lab["backend"], lab["direction"])
                snap.nbytes[key] = snap.nbytes.get(key, 0.0) + v
            elif fam.name.startswith(_TIER) and s.name == fam.name:
                key = (lab["backend"], fam.name[len(_TIER):])
                snap.gauges[key] = snap.gauges.get(key, 0.0) + v
            elif fam.name == _BY_SOURCE and s.name == fam.name + "_total":
                by_source[lab["source"]] = by_source.get(lab["source"], 0.0) + v
            elif fam.name in hits_names and s.name == fam.name + "_total":
                tier = hits_names[fam.name]
                snap.hits[tier] = snap.hits.get(tier, 0.0) + v
    if by_source:
        snap.hits = by_source
    return snap


def failures(snap: Snapshot) -> dict[str, dict[str, float]]:
    """backend -> its failure counters (stat name -> value)."""
    out: dict[str, dict[str, float]] = {}
    for stat, v in snap.counters.items():
        backend, _, name = stat.partition(".")
        if name.endswith(FAILURE_SUFFIXES):
            out.setdefault(backend, {})[name] = v
    return out


def _of_direction(name: str, direction: str) -> bool:
    """``load_failures`` / ``loads_failed`` are the ``load`` row's; ``store_failures`` the store row's."""
    return name.split("_", 1)[0].rstrip("s") == direction


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _window(cur: Hist, old: Hist | None) -> Hist:
    """The observations since ``old`` when there are any, else all of them."""
    return cur.minus(old) if old is not None and cur.count > old.count else cur


def render_server(url: str, cur: Snapshot, prev: Snapshot | None) -> list[str]:
    dt = cur.t - prev.t if prev is not None else 0.0
    hits = "  ".join(f"{tier} {n:.0f}" for tier, n in cur.hits.items() if n > 0 or tier == "device")
    wait = _window(cur.load_wait, prev.load_wait if prev is not None else None)
    lines = [f"{url}   cache hits (prompt tokens): {hits or '-'}   load wait ms P50 "
             f"{_ms(wait.quantile(0.5))} P99 {_ms(wait.quantile(0.99))}"]
    held = sorted({b for b, _ in cur.gauges})
    for b in held:
        blocks = cur.gauges.get((b, "held_blocks"), 0.0)
        cap = cur.gauges.get((b, "capacity_blocks"))
        lines.append(f"  {b} holds {blocks:.0f}{f'/{cap:.0f}' if cap else ''} blocks, "
                     f"{_size(cur.gauges.get((b, 'held_bytes'), 0.0))}")
    fails = failures(cur)
    lines.append(f"  {'backend':<14}{'dir':<7}{'transfers':>10}{'/s':>8}{'P50 ms':>9}{'P99 ms':>9}"
                 f"{'MiB/s':>9}{'failures':>10}")
    for (b, d), h in sorted(cur.seconds.items()):
        old = prev.seconds.get((b, d)) if prev is not None else None
        window = _window(h, old)
        rate = f"{(h.count - old.count) / dt:.1f}" if old is not None and dt > 0 else "-"
        moved = cur.nbytes.get((b, d), 0.0) - (prev.nbytes.get((b, d), 0.0) if prev else 0.0)
        mibs = f"{moved / dt / 2**20:.1f}" if prev is not None and dt > 0 else "-"
        row_fails = sum(v for n, v in fails.get(b, {}).items() if _of_direction(n, d))
        lines.append(f"  {b:<14}{d:<7}{h.count:>10.0f}{rate:>8}{_ms(window.quantile(0.5)):>9}"
                     f"{_ms(window.quantile(0.99)):>9}{mibs:>9}{row_fails:>10.0f}")
    if not cur.seconds:
        lines.append("  (no kvconnect transfer histograms on this server)")
    other = [f"{b}.{n} {v:.0f}" for b, fs in sorted(fails.items()) for n, v in sorted(fs.items())
             if v > 0 and not any(_of_direction(n, d) for bb, d in cur.seconds if bb == b)]
    if other:
        lines.append("  other failures: " + "  ".join(other))
    return lines


def fetch(url: str, timeout: float) -> str:
    target = url.rstrip("/")
    if not target.endswith("/metrics"):
        target += "/metrics"
    with urllib.request.urlopen(target, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def snapshot_all(urls: list[str], timeout: float) -> dict[str, Snapshot | str]:
    out: dict[str, Snapshot | str] = {}
    for u in urls:
        try:
            out[u] = parse(fetch(u, timeout))
        except (OSError, urllib.error.URLError, ValueError) as e:
            out[u] = f"unreachable: {e}"
    return out


def render(snaps: dict[str, Snapshot | str], prev: dict[str, Snapshot | str] | None = None) -> str:
    lines: list[str] = []
    for url, cur in snaps.items():
        if isinstance(cur, str):
            lines.append(f"{url}   {cur}")
        else:
            old = (prev or {}).get(url)
            lines.extend(render_server(url, cur, old if isinstance(old, Snapshot) else None))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvconnect top", description=__doc__.split("\n\n")[0])
    p.add_argument("urls", nargs="+", help="server base URLs (http://host:port) or their /metrics")
    p.add_argument(
        "--once", action="store_true", help="print one snapshot and exit (1 if a server is unreachable)"
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--timeout", type=float, default=5.0, help="deadline of one /metrics fetch")
    a = p.parse_args(argv)
    if a.interval <= 0:
        p.error("--interval must be positive")
    snaps = snapshot_all(a.urls, a.timeout)
    if a.once:
        sys.stdout.write(render(snaps))
        return 1 if any(isinstance(s, str) for s in snaps.values()) else 0
    prev = None
    try:
        while True:
            # Home the cursor and clear the screen: the view is redrawn in place.
            sys.stdout.write(
                "\x1b[H\x1b[2J" + time.strftime("kvconnect top   %H:%M:%S\n\n") + render(snaps, prev)
            )
            sys.stdout.flush()
            time.sleep(a.interval)
            prev, snaps = snaps, snapshot_all(a.urls, a.timeout)
    except KeyboardInterrupt:
        return 0
