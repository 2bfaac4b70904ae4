"""The test-server helpers' own rules: ports outside the kernel's ephemeral range, and the root
cause of a failed start taken from the current start's part of an appended log."""

from __future__ import annotations

import socket

import pytest

from kvconnect.testing import servers as S

pytestmark = pytest.mark.unit


def test_ports_are_free_distinct_and_below_the_ephemeral_range():
    lo, _ = S._ephemeral_range()
    ports = [S.free_port() for _ in range(20)] + [S.free_port_range(4) for _ in range(5)]
    assert len(set(ports)) == len(ports)
    assert all(p < lo for p in ports), (lo, ports)
    with socket.socket() as s:
        s.bind((S.HOST, ports[0]))  # really free


def test_first_traceback_is_the_one_of_the_latest_start(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("### 10:00:00 a: argv\nTraceback (most recent call last)\nOldError: before\n"
                   "### 10:01:00 a: argv\nstarting\nTraceback (most recent call last)\n"
                   "  File \"core.py\", line 1\nRootCause: port taken\nTraceback (most recent call last)\nEcho\n")
    out = S.first_traceback(log)
    assert "RootCause: port taken" in out and "OldError" not in out
    log.write_text("### 10:01:00 a: argv\nall fine\n")
    assert S.first_traceback(log) == ""
    assert S.first_traceback(tmp_path / "missing.log") == ""
