"""The end-to-end sweep as a pytest plugin: a list of configurations that must each run and pass.

Every test of a configuration carries ``@pytest.mark.sweep("<config id>")``. At the end of the
session a table of every listed configuration is printed with its result and durations, and a
listed configuration that did not run and pass -- skipped, deselected, failed, or never collected --
fails the run (exit status 1). A silently skipped configuration is not a pass. Completeness is not
enforced only where that is asked for on purpose:

* no sweep test was selected at all (e.g. ``-m unit``);
* ``KVCONNECT_E2E_PARTIAL=1`` (running a subset with ``-k`` while working on one model);
* a package the sweep needs is missing, outside a run that must prove everything
  (:func:`kvconnect.testing.environment.required`: CI, ``scripts/test.sh``), where it is enforced.

``tests/e2e/conftest.py`` lists the configurations and registers :class:`SweepPlugin`.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from kvconnect.testing import environment

PARTIAL_ENV = "KVCONNECT_E2E_PARTIAL"


@dataclass(frozen=True)
class SweepConfig:
    id: str
    model: str
    mode: str
    block_sizes: str  # "P32->D32", or one size for a single instance
    what: str


@dataclass
class _Result:
    tests: int = 0
    passed: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    setup_s: float = 0.0
    call_s: float = 0.0
    details: list[str] = field(default_factory=list)

    def status(self) -> str:
        if self.failed:
            return "FAILED"
        if self.skipped and not self.passed:
            return "SKIPPED"
        if self.passed and self.passed == self.tests:
            return "passed"
        return "INCOMPLETE"


def _reason(rep) -> str:
    lr = rep.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr)[:120]


def _short(rep) -> str:
    lines = (str(getattr(rep, "longreprtext", "") or rep.longrepr or "")).strip().splitlines()
    errors = [ln[2:].strip() for ln in lines if ln.startswith("E ")]
    return (errors[0] if errors else (lines[-1] if lines else "failed"))[:160]


class SweepPlugin:
    """Tracks the sweep's configurations through one pytest session (hooks below)."""

    def __init__(self, configs: Sequence[SweepConfig], deps: Sequence[str] = ("vllm", "nixl", "vllm_router")):
        self.configs = tuple(configs)
        self.ids = {c.id for c in self.configs}
        self.deps = tuple(deps)
        self.results: dict[str, _Result] = {}
        self.selected: set[str] = set()
        self.bad: list[str] = []
        self.t0 = time.monotonic()

    def deps_missing(self) -> list[str]:
        return [m for m in self.deps if importlib.util.find_spec(m) is None]

    def status(self, cid: str) -> str:
        r = self.results.get(cid)
        return "NOT RUN" if r is None else r.status()

    def enforced(self) -> bool:
        if not self.selected or os.environ.get(PARTIAL_ENV) == "1":
            return False
        return environment.required() or not self.deps_missing()

    # -- hooks ------------------------------------------------------------------------------------
    def pytest_configure(self, config):
        config.addinivalue_line("markers", "sweep(config_id): the e2e sweep configuration this test proves")

    def pytest_collection_modifyitems(self, config, items):
        for item in items:
            m = item.get_closest_marker("sweep")
            if m is not None and m.args[0] not in self.ids:
                raise pytest.UsageError(
                    f"{item.nodeid}: sweep config {m.args[0]!r} is not listed in the sweep"
                )

    def pytest_collection_finish(self, session):
        self.selected = {m.args[0] for item in session.items if (m := item.get_closest_marker("sweep"))}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        m = item.get_closest_marker("sweep")
        if m is None:
            return
        rep = outcome.get_result()
        r = self.results.setdefault(m.args[0], _Result())
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
            r.details.extend(str(v) for k, v in item.user_properties if k == "sweep")
        elif rep.when == "teardown" and rep.failed:
            r.failed.append(f"{item.name}: teardown failed")

    def pytest_sessionfinish(self, session, exitstatus):
        if not self.enforced():
            return
        self.bad = [c.id for c in self.configs if self.status(c.id) != "passed"]
        if self.bad and session.exitstatus == 0:
            session.exitstatus = 1

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.selected:
            return
        tr = terminalreporter
        tr.section("kvconnect e2e sweep")
        missing = self.deps_missing()
        if missing and not self.enforced():
            tr.write_line(f"sweep not enforced: not installed: {', '.join(missing)}")
            return
        rows = [("config", "model", "mode", "block sizes", "result", "setup s", "run s", "detail")]
        for c in self.configs:
            r = self.results.get(c.id, _Result())
            detail = "; ".join(r.details) or (
                r.failed[0] if r.failed else (r.skipped[0] if r.skipped else c.what)
            )
            rows.append((c.id, c.model, c.mode, c.block_sizes, self.status(c.id), f"{r.setup_s:.1f}",
                         f"{r.call_s:.1f}", detail[:150]))
        widths = [max(len(row[i]) for row in rows) for i in range(7)]
        for row in rows:
            tr.write_line("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:7])) + "  " + row[7])
        tr.write_line(f"session wall time {time.monotonic() - self.t0:.0f} s")
        if self.bad:
            tr.write_line(
                f"SWEEP INCOMPLETE: {len(self.bad)} listed configuration(s) did not run and pass: "
                f"{', '.join(self.bad)} -> the run fails ({PARTIAL_ENV}=1 allows subsets)",
                red=True,
            )
        elif not self.enforced():
            tr.write_line("(partial run: completeness not enforced)")
