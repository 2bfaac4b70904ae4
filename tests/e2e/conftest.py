"""The kvconnect end-to-end SWEEP: which configurations must run, and a table of what ran.

Every test of a sweep configuration carries ``@pytest.mark.sweep("<config id>")``. At the end of
the session the table below is printed with each configuration's result and durations, and a
configuration that is listed here but did not run and pass FAILS the run (exit status 1) — a
silently skipped or deselected configuration is not a pass. Two exceptions:

* vLLM, NIXL or vllm-router is not installed: the sweep skips cleanly (nothing is enforced);
* no sweep test was selected at all (e.g. ``-m unit``), or ``KVCONNECT_E2E_PARTIAL=1`` is set to
  run a subset on purpose (e.g. ``-k mla`` while working on one model).
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class SweepConfig:
    id: str
    model: str
    mode: str
    block_sizes: str  # "P32->D32", or one size for a single instance
    what: str


#: Every configuration the sweep must run (models x modes x block sizes).
SWEEP: tuple[SweepConfig, ...] = (
    SweepConfig("gqa-single-baseline", "gqa", "single", "32", "reference outputs, varied and deterministic"),
    SweepConfig("gqa-pull-router-name", "gqa", "P/D pull", "P32->D32",
                "router, kv_connector=KVConnect; cmpl+stream+chat, 3 prompt lengths == single"),
    SweepConfig("gqa-push-router-modpath", "gqa", "P/D push", "P32->D32",
                "router, kv_connector_module_path form; == single"),
    SweepConfig("gqa-pull-mixed-bs", "gqa", "P/D pull", "P64->D32", "router; block sizes differ; == single"),
    SweepConfig("gqa-prefill-killed-fail", "gqa", "P/D pull, policy fail", "P32->D32",
                "prefill killed before decode: clean error, no hang"),
    SweepConfig("gqa-offload-single", "gqa", "cpu_offload", "32",
                "shared prefix served from the CPU tier after local eviction; == single"),
    SweepConfig("gqa-offload-events", "gqa", "cpu_offload + vLLM KV events (ZMQ)", "32",
                "router-style subscriber's CPU index == tier across stores/evictions; hashes == device; "
                "histogram counts == transfers; kvconnect top --once"),
    SweepConfig("gqa-pull+offload-decode", "gqa", "P/D pull + cpu_offload (decode)", "P32->D32",
                "router P/D == single; repeated prefix loaded from CPU the second time"),
    SweepConfig("gqa-prefill-killed-recompute", "gqa", "P/D pull + cpu_offload, policy recompute",
                "P32->D32", "prefill killed before decode: recomputed, == single"),
    SweepConfig("gqa-pull-sustained-load", "gqa", "P/D pull, concurrent clients, client aborts", "P32->D32",
                "hundreds of requests, some hung up mid-flight: completed == single, no block or request left"),
    SweepConfig("mla-pull-router", "mla", "P/D pull", "P16->D16", "== vLLM NixlConnector MLA P/D"),
    SweepConfig("hybrid-pull-router", "hybrid", "P/D pull", "P32->D32",
                "3 KV-cache groups (2 sliding + full); == single"),
    SweepConfig("mqa-bf16-pull-uneven-bs", "mqa", "P/D pull, bfloat16", "P96->D64",
                "1 KV head, head dim 80, 3 layers; block sizes neither dividing the other; == single"),
)
SWEEP_IDS = {c.id for c in SWEEP}
_DEPS = ("vllm", "nixl", "vllm_router")


def sweep_deps_missing() -> list[str]:
    return [m for m in _DEPS if importlib.util.find_spec(m) is None]


@dataclass
class _Result:
    tests: int = 0
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    setup_s: float = 0.0
    call_s: float = 0.0
    details: list[str] = field(default_factory=list)


_results: dict[str, _Result] = {}
_selected: set[str] = set()
_session_t0 = time.monotonic()


def pytest_configure(config):
    config.addinivalue_line("markers", "sweep(config_id): the e2e sweep configuration this test proves")


def pytest_collection_modifyitems(config, items):
    for item in items:
        m = item.get_closest_marker("sweep")
        if m is None:
            continue
        cid = m.args[0]
        if cid not in SWEEP_IDS:
            raise pytest.UsageError(f"{item.nodeid}: sweep config {cid!r} is not listed in tests/e2e/conftest.py")


def pytest_collection_finish(session):
    _selected.clear()
    for item in session.items:
        m = item.get_closest_marker("sweep")
        if m is not None:
            _selected.add(m.args[0])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    m = item.get_closest_marker("sweep")
    if m is None:
        return
    rep = outcome.get_result()
    r = _results.setdefault(m.args[0], _Result())
    if rep.when == "setup":
        r.setup_s += rep.duration
        if rep.skipped:
            r.tests += 1
            r.skipped.append(_reason(rep))
        elif rep.failed:
            r.tests += 1
            r.failed.append(f"{item.name}: setup failed")
    elif rep.when == "call":
        r.tests += 1
        r.call_s += rep.duration
        if rep.passed:
            r.passed += 1
        elif rep.skipped:
            r.skipped.append(_reason(rep))
        else:
            r.failed.append(f"{item.name}: {_short(rep)}")
        for k, v in item.user_properties:
            if k == "sweep":
                r.details.append(str(v))
    elif rep.when == "teardown" and rep.failed:
        r.failed.append(f"{item.name}: teardown failed")


def _reason(rep) -> str:
    lr = rep.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)[:120]


def _short(rep) -> str:
    text = str(getattr(rep, "longreprtext", "") or rep.longrepr or "")
    lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
    return (lines[0][2:].strip() if lines else text.strip().splitlines()[-1:] and text.strip().splitlines()[-1])[:160]


def _status(cid: str) -> str:
    r = _results.get(cid)
    if r is None:
        return "NOT RUN"
    if r.failed:
        return "FAILED"
    if r.skipped and not r.passed:
        return "SKIPPED"
    if r.passed and r.passed == r.tests:
        return "passed"
    return "INCOMPLETE"


def _enforced() -> bool:
    return bool(_selected) and not sweep_deps_missing() and os.environ.get("KVCONNECT_E2E_PARTIAL") != "1"


def pytest_sessionfinish(session, exitstatus):
    if not _enforced():
        return
    bad = [c.id for c in SWEEP if _status(c.id) != "passed"]
    if bad and session.exitstatus == 0:
        session.exitstatus = 1
    session.config._kvc_sweep_bad = bad  # for the summary


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _selected:
        return
    tr = terminalreporter
    tr.section("kvconnect e2e sweep")
    missing = sweep_deps_missing()
    if missing:
        tr.write_line(f"sweep skipped: not installed: {', '.join(missing)}")
        return
    rows = [("config", "model", "mode", "block sizes", "result", "setup s", "run s", "detail")]
    for c in SWEEP:
        r = _results.get(c.id, _Result())
        detail = "; ".join(r.details) or (r.failed[0] if r.failed else (r.skipped[0] if r.skipped else c.what))
        rows.append((c.id, c.model, c.mode, c.block_sizes, _status(c.id), f"{r.setup_s:.1f}", f"{r.call_s:.1f}",
                     detail[:150]))
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    for row in rows:
        tr.write_line("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:7])) + "  " + row[7])
    tr.write_line(f"session wall time {time.monotonic() - _session_t0:.0f} s")
    bad = getattr(config, "_kvc_sweep_bad", None)
    if bad:
        tr.write_line(f"SWEEP INCOMPLETE: {len(bad)} listed configuration(s) did not run and pass: "
                      f"{', '.join(bad)} -> the run fails (KVCONNECT_E2E_PARTIAL=1 allows subsets)", red=True)
    elif not _enforced():
        tr.write_line("(partial run: completeness not enforced)")
