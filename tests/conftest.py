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
    for item in items:
        tier = pathlib.Path(str(item.fspath)).parent.name
        if tier in _TIERS and not item.get_closest_marker(_TIERS[tier]):
            item.add_marker(getattr(pytest.mark, _TIERS[tier]))
        if item.get_closest_marker("gpu") and not _has_gpu():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA/ROCm device"))


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False
