"""The e2e sweep fails the run when a listed configuration did not run and pass (skipped,
deselected, never collected, failed), and only a deliberate partial run turns that off."""

from __future__ import annotations

import pytest

CONFTEST = """
from kvconnect.testing.sweep import SweepConfig, SweepPlugin

SWEEP = (SweepConfig("alpha", "m", "single", "32", "first"),
         SweepConfig("beta", "m", "P/D", "P32->D32", "second"))


def pytest_configure(config):
    config.pluginmanager.register(SweepPlugin(SWEEP, deps={deps!r}), "kvconnect-sweep")
"""

TESTS = """
import pytest

@pytest.mark.sweep("alpha")
def test_alpha():
    pass

@pytest.mark.sweep("beta")
def test_beta():
    {beta}
"""


@pytest.fixture
def sweep_run(pytester, monkeypatch):
    for var in ("CI", "KVCONNECT_REQUIRE_ALL", "KVCONNECT_E2E_PARTIAL"):
        monkeypatch.delenv(var, raising=False)

    def run(beta: str = "pass", *args: str, deps: tuple[str, ...] = ("json",), beta_test: bool = True):
        pytester.makeconftest(CONFTEST.format(deps=deps))
        body = TESTS.format(beta=beta)
        if not beta_test:
            body = body.split('@pytest.mark.sweep("beta")')[0]
        pytester.makepyfile(test_sweep_cases=body)
        return pytester.runpytest_inprocess(*args)

    return run


def test_every_configuration_passing_passes(sweep_run):
    result = sweep_run()
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*alpha*passed*", "*beta*passed*"])


def test_a_skipped_configuration_fails_the_run(sweep_run):
    result = sweep_run("pytest.skip('server would not start')")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*beta*SKIPPED*server would not start*", "*SWEEP INCOMPLETE*beta*"])


def test_a_deselected_configuration_fails_the_run(sweep_run):
    result = sweep_run("pass", "-k", "alpha")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*beta*NOT RUN*", "*SWEEP INCOMPLETE*beta*"])


def test_a_configuration_without_a_test_fails_the_run(sweep_run):
    result = sweep_run(beta_test=False)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*SWEEP INCOMPLETE*beta*"])


def test_a_failed_configuration_is_named_in_the_table(sweep_run):
    result = sweep_run("assert 1 + 1 == 3, 'tokens differ'")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*beta*FAILED*tokens differ*"])


def test_a_deliberate_partial_run_is_not_enforced(sweep_run, monkeypatch):
    monkeypatch.setenv("KVCONNECT_E2E_PARTIAL", "1")
    result = sweep_run("pass", "-k", "alpha")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*partial run: completeness not enforced*"])


def test_missing_engine_packages_relax_the_sweep_only_outside_ci(sweep_run, monkeypatch):
    relaxed = sweep_run("pytest.skip('no vllm')", deps=("kvconnect_no_such_module",))
    assert relaxed.ret == 0
    relaxed.stdout.fnmatch_lines(["*sweep not enforced: not installed: kvconnect_no_such_module*"])
    monkeypatch.setenv("CI", "true")
    enforced = sweep_run("pytest.skip('no vllm')", deps=("kvconnect_no_such_module",))
    assert enforced.ret == 1
    enforced.stdout.fnmatch_lines(["*SWEEP INCOMPLETE*beta*"])


def test_a_test_naming_an_unlisted_configuration_is_a_usage_error(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST.format(deps=("json",)))
    pytester.makepyfile(test_bad="""
import pytest

@pytest.mark.sweep("gamma")
def test_gamma():
    pass
""")
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*sweep config 'gamma' is not listed*"])
