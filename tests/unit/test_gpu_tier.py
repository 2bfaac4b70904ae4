"""The gpu tier without a device: its tests skip (never error), each saying why and what to run
instead, and scripts/gpu-check.sh refuses to pass. Runs with CUDA hidden, so it holds on a GPU
machine too."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import GPU_SKIP_PREFIX

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], tmp_path) -> subprocess.CompletedProcess:
    # CI's every-package check is the outer session's business, not this inner run's
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "KVCONNECT_REQUIRE_ALL")}
    env.update(NO_GPU, TMPDIR=str(tmp_path))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_gpu_tests_skip_without_a_device_each_naming_the_reason(tmp_path):
    p = _run(
        [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
        tmp_path,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    summary = re.search(r"(\d+) skipped", out)
    assert summary and int(summary.group(1)) >= 20, out[-3000:]
    assert not re.search(r"\d+ (failed|errors?)\b", out), out[-3000:]
    assert " passed" not in out.splitlines()[-1]  # nothing gpu-marked ran on the host
    reasons = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert reasons
    for ln in reasons:
        assert GPU_SKIP_PREFIX in ln and "scripts/gpu-check.sh" in ln, ln


def test_gpu_check_script_fails_clearly_without_a_device(tmp_path):
    env = {**os.environ, **NO_GPU, "PYTHON": sys.executable}
    p = subprocess.run(["bash", "scripts/gpu-check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no CUDA device" in p.stderr and "FAILED: this check needs a CUDA device" in p.stderr
