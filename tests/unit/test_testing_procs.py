"""The server supervisor: a server is stopped as a whole process tree (also children that left its
process group), one that ignores SIGTERM is killed after the grace period, nothing is left
running; ports lie outside the ephemeral range; a failed start's root cause is found in its log."""

from __future__ import annotations

import json
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from kvconnect.testing import ports, procs

pytestmark = pytest.mark.unit

# The leader starts a child, which starts a grandchild in the group and one in a session of its
# own (out of the group, as a daemonising worker would), writes all PIDs, then sleeps.
# IGNORE lists the roles that ignore SIGTERM.
_TREE = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    role, out, ignore = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    if role in ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = [sys.executable, __file__]
    kids = []
    if role == "leader":
        kids = [subprocess.Popen(me + ["child", out, sys.argv[3]])]
    elif role == "child":
        kids = [subprocess.Popen(me + ["grandchild", out, sys.argv[3]]),
                subprocess.Popen(me + ["escaped", out, sys.argv[3]], start_new_session=True)]
    with open(out + "." + role, "w") as f:
        json.dump([os.getpid()] + [k.pid for k in kids], f)
    while True:
        time.sleep(0.1)
""")
_ROLES = ("leader", "child", "grandchild", "escaped")


def _start_tree(tmp_path: Path, ignore: str = "") -> tuple[procs.ServerProcess, list[psutil.Process]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    out = tmp_path / "pids"
    server = procs.ServerProcess(name="tree", argv=[sys.executable, str(script), "leader", str(out), ignore],
                                 env={}, port=0, log_path=tmp_path / "tree.log").start()
    deadline = time.monotonic() + 30
    while not all(Path(f"{out}.{r}").exists() for r in _ROLES):
        assert server.alive() and time.monotonic() < deadline, server.log_tail()
        time.sleep(0.05)
    time.sleep(0.3)  # let each one's signal handler be installed
    pids = {r: json.loads(Path(f"{out}.{r}").read_text())[0] for r in _ROLES}
    assert not server.poll_ready()  # no health endpoint; the supervisor notes the descendants
    return server, [psutil.Process(pids[r]) for r in _ROLES]


def _running(ps: list[psutil.Process]) -> list[int]:
    """Those still running (a zombie waiting for init to reap it runs nothing)."""
    out = []
    for p in ps:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_a_server_is_stopped_with_its_whole_tree_including_children_that_left_its_group(tmp_path):
    server, tree = _start_tree(tmp_path)
    assert len(_running(tree)) == 4
    t0 = time.monotonic()
    rc = server.stop(grace_s=20)
    assert time.monotonic() - t0 < 10, "all of them exit on SIGTERM: no wait for the grace period"
    assert rc == -signal.SIGTERM
    assert _running(tree) == []
    assert server.stop() == rc  # idempotent


def test_processes_that_ignore_sigterm_are_killed_after_the_grace_period(tmp_path):
    server, tree = _start_tree(tmp_path, ignore="leader,escaped")
    t0 = time.monotonic()
    rc = server.stop(grace_s=1.5)
    took = time.monotonic() - t0
    assert 1.5 <= took < 1.5 + procs.KILL_WAIT_S, took
    assert rc == -signal.SIGKILL
    assert _running(tree) == []


def test_an_escaped_grandchild_that_ignores_sigterm_is_killed_when_its_leader_exits_at_once(tmp_path):
    server, tree = _start_tree(tmp_path, ignore="escaped")
    rc = server.stop(grace_s=1.0)
    assert rc == -signal.SIGTERM  # the leader itself exited on SIGTERM
    assert _running(tree) == []


def test_orphans_of_a_leader_that_died_first_are_still_stopped_also_outside_its_group(tmp_path):
    server, tree = _start_tree(tmp_path)
    tree[0].kill()  # the leader dies on its own; its tree is orphaned
    deadline = time.monotonic() + 10
    while server.alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(_running(tree[1:])) == 3
    server.stop(grace_s=5)
    assert _running(tree) == []


def test_stop_all_stops_every_server_not_stopped_yet(tmp_path):
    a, tree_a = _start_tree(tmp_path / "a")
    b, tree_b = _start_tree(tmp_path / "b")
    procs.stop_all()
    assert _running(tree_a + tree_b) == []
    assert not a.alive() and not b.alive()


def test_a_server_that_exits_before_ready_raises_with_its_root_cause(tmp_path):
    s = procs.ServerProcess(
        name="bad",
        argv=[sys.executable, "-c", "raise SystemExit('RootCause: no model')"],
        env={},
        port=ports.free_port(),
        log_path=tmp_path / "bad.log",
    ).start()
    with pytest.raises(procs.ServerError, match="RootCause: no model"):
        s.wait_ready(time.monotonic() + 30)


def test_a_server_not_ready_by_the_deadline_is_stopped_and_named(tmp_path):
    s = procs.ServerProcess(name="silent", argv=[sys.executable, "-c", "import time; time.sleep(60)"],
                            env={}, port=ports.free_port(), log_path=tmp_path / "silent.log").start()
    proc = psutil.Process(s.pid)
    with pytest.raises(procs.ServerError, match="not ready by the deadline: silent"):
        s.wait_ready(time.monotonic() + 1.0)
    assert _running([proc]) == []


def test_ports_are_free_distinct_and_below_the_ephemeral_range():
    lo, _ = ports.ephemeral_range()
    got = [ports.free_port() for _ in range(20)] + [ports.free_port_range(4) for _ in range(5)]
    assert len(set(got)) == len(got)
    assert all(p < lo for p in got), (lo, got)
    with socket.socket() as s:
        s.bind((procs.HOST, got[0]))  # really free


def test_first_traceback_is_the_one_of_the_latest_start(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "### 10:00:00 a: argv\nTraceback (most recent call last)\nOldError: before\n"
        "### 10:01:00 a: argv\nstarting\nTraceback (most recent call last)\n"
        '  File "core.py", line 1\nRootCause: port taken\nTraceback (most recent call last)\nEcho\n'
    )
    out = procs.first_traceback(log)
    assert "RootCause: port taken" in out and "OldError" not in out
    log.write_text("### 10:01:00 a: argv\nall fine\n")
    assert procs.first_traceback(log) == ""
    assert procs.first_traceback(tmp_path / "missing.log") == ""
