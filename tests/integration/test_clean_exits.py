"""Processes exit cleanly, and a run that must prove everything cannot skip a tier.

* A process that made a real NIXL agent through kvconnect exits with code 0, with ``UCX_MODULES``
  unset: kvconnect applies its UCX defaults itself (on a host with ``ibverbs-providers`` such a
  process died with SIGSEGV at exit). A user's own ``UCX_MODULES`` is kept.
* In CI the host has ``ibverbs-providers`` installed (scripts/setup.sh), so the guard is real there.
* Under ``CI=true`` a package a tier needs that does not import stops the session naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvconnect.testing import environment

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

_MAKE_AGENT = textwrap.dedent("""
    import os, sys
    from kvconnect.backends.nixl import NixlTransport
    t = NixlTransport(f"exit-check-{os.getpid()}")
    print("UCX_MODULES=" + os.environ.get("UCX_MODULES", "<unset>"), flush=True)
""")


def _run_child(
    code: str, env_changes: dict[str, str | None], timeout: float = 60
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "UCX_NET_DEVICES": "lo"}
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )


def _ibverbs_providers_installed() -> bool:
    return any(Path(d).is_dir() and any(Path(d).glob("lib*-rdmav*.so"))
               for d in ("/usr/lib/x86_64-linux-gnu/libibverbs", "/usr/lib/aarch64-linux-gnu/libibverbs",
                         "/usr/lib64/libibverbs", "/usr/lib/libibverbs"))


def test_a_process_that_made_a_nixl_agent_through_kvconnect_exits_cleanly():
    pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
    proc = _run_child(_MAKE_AGENT, {"UCX_MODULES": None})
    assert proc.returncode == 0, (
        f"exit code {proc.returncode} (ibverbs-providers installed: {_ibverbs_providers_installed()})\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    assert "UCX_MODULES=^efa" in proc.stdout  # what kvconnect set before the agent loaded UCX


def test_a_users_own_ucx_modules_is_kept():
    pytest.importorskip("nixl_cu12._api", reason="real NIXL (nixl-cu12) is not installed")
    proc = _run_child(_MAKE_AGENT, {"UCX_MODULES": "^efa,ib"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UCX_MODULES=^efa,ib" in proc.stdout


def test_ci_hosts_have_ibverbs_providers_so_the_exit_guard_is_exercised():
    if not environment.required():
        pytest.skip("only required in CI / scripts/test.sh, whose set-up installs libibverbs1")
    assert _ibverbs_providers_installed(), (
        "ibverbs-providers is missing: scripts/setup.sh should install libibverbs1"
    )


def test_ci_run_stops_naming_a_package_that_does_not_import(tmp_path):
    shadow = tmp_path / "shadow" / "vllm_router"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('vllm_router is broken on purpose')\n")
    (tmp_path / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    env = {**os.environ, "CI": "true", "PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            "-c",
            str(ROOT / "pyproject.toml"),
            "--confcutdir",
            str(ROOT / "tests"),
            str(ROOT / "tests" / "unit" / "test_package.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "vllm_router" in out and "vllm_router is broken on purpose" in out, out[-3000:]
    assert " passed" not in out  # it stopped before running anything
