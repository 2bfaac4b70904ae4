"""Shared test set-up: tier markers by folder, GPU skipping, and a deadline helper."""

from __future__ import annotations

import os
import pathlib

import pytest

from kvconnect.testing import environment
from kvconnect.ucx_env import apply_ucx_defaults

# NIXL/UCX read these themselves; set before any test imports nixl. kvconnect's own agents apply
# the UCX defaults themselves; tests that make raw agents (contract tests, probes) need them too.
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("UCX_LOG_LEVEL", "error")
apply_ucx_defaults()

pytest_plugins = ["pytester"]  # tests of the test machinery itself (the sweep's enforcement)


def pytest_configure(config):
    """In CI and under scripts/test.sh every tier must run: a package a tier imports that does not
    import stops the session here, naming it, instead of letting that tier skip and exit 0."""
    if environment.required() and not config.option.collectonly:
        bad = environment.missing_modules()
        if bad:
            pytest.exit(environment.describe_missing(bad), returncode=pytest.ExitCode.USAGE_ERROR)


_TIERS = {"unit": "unit", "integration": "integration", "e2e": "e2e", "gpu": "gpu"}


def pytest_collection_modifyitems(config, items):
    no_gpu = None
    for item in items:
        tier = pathlib.Path(str(item.fspath)).parent.name
        # A test in tests/gpu marked unit or integration is the host-memory variant of a device
        # test: it runs everywhere, so it is not given the gpu marker.
        host_variant = tier == "gpu" and any(item.get_closest_marker(m) for m in ("unit", "integration"))
        if tier in _TIERS and not item.get_closest_marker(_TIERS[tier]) and not host_variant:
            item.add_marker(getattr(pytest.mark, _TIERS[tier]))
        if item.get_closest_marker("gpu"):
            no_gpu = _why_no_gpu() if no_gpu is None else no_gpu
            if no_gpu:
                item.add_marker(pytest.mark.skip(reason=no_gpu))


#: Every skip of a gpu test for want of a device starts with this.
GPU_SKIP_PREFIX = "gpu tier: no CUDA/ROCm device"


def _why_no_gpu() -> str:
    """Empty when a device is usable; else the skip reason, saying what was looked at."""
    try:
        import torch
    except Exception as e:
        return f"{GPU_SKIP_PREFIX} (torch does not import: {type(e).__name__})"
    if torch.cuda.is_available():
        return ""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "a CPU-only build")
    return (f"{GPU_SKIP_PREFIX} (torch {torch.__version__}, {build}, sees none); "
            "run scripts/gpu-check.sh on a GPU machine")
