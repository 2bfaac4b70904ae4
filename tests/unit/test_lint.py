"""The repository passes ``ruff check`` with pyproject.toml's rules, line length (E501) included: CI
runs this tier, so a lint error fails the run like a failing test."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_check_passes_on_the_library_tests_and_scripts():
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "kvconnect", "tests", "scripts"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
