"""Server subprocesses under supervision: start with a log file, wait for readiness until a
deadline, stop as a whole process tree.

Every :class:`ServerProcess` runs in its own process group and writes its output to a log file
whose tail (and first traceback) is put into every error. :func:`stop_tree` stops the group,
every descendant psutil finds and every one seen while the server started (also ones that left
the group with ``setsid``, or were orphaned by a leader that died first): SIGTERM, then SIGKILL
for whatever still runs after the grace period. Every server not stopped by its owner is stopped
by :func:`stop_all` at interpreter exit, so a failing test leaves no engine behind. What runs in
the process is :mod:`.launch`'s job (vLLM, the router) and :mod:`.mooncake`'s (a Mooncake store).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from kvconnect.errors import KVConnectError

logger = logging.getLogger(__name__)

#: Every test server binds loopback only.
HOST = "127.0.0.1"
#: Default deadline for a set of servers to answer their health check.
START_DEADLINE_S = 240.0
#: After SIGKILL, how long to wait for the tree to be gone before reporting survivors.
KILL_WAIT_S = 10.0


class ServerError(KVConnectError, RuntimeError):
    """A server failed to start, died, or did not answer in time. The message holds its log tail."""


# ----------------------------------------------------------------------------------------------
# stopping a process tree
# ----------------------------------------------------------------------------------------------


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The leader's descendants and the other members of its process group, as psutil objects
    (each remembers its creation time, so a PID reused later is never signalled)."""
    leader = proc.pid
    found: dict[int, psutil.Process] = {}
    if proc.returncode is None:
        # Not reaped yet: the PID, hence the group id, is still ours (even if it has exited).
        found.update((p.pid, p) for p in children(proc))
    elif psutil.pid_exists(leader):
        return []  # reaped and the PID taken by another process: a group of that id is not ours
    # A group id outlives its leader while members remain, and the kernel gives no new process
    # that PID meanwhile: members found here are ours (orphans that left the leader's tree).
    for p in psutil.process_iter():
        if p.pid == leader or p.pid in found:
            continue
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(p.pid) == leader:
                found[p.pid] = p
    return list(found.values())


def children(proc: subprocess.Popen) -> list[psutil.Process]:
    """The descendants of a not yet reaped ``proc`` (none once it is reaped: its PID may be reused)."""
    if proc.returncode is not None:
        return []
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _running(p: psutil.Process) -> bool:
    """Still running: neither gone nor a zombie (a zombie runs nothing; its parent or init reaps it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_all(procs: Sequence[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)  # psutil checks the PID still names the same process


def _wait_gone(
    proc: subprocess.Popen, others: Sequence[psutil.Process], deadline: float
) -> list[psutil.Process]:
    """Wait until the leader has exited and none of ``others`` runs, or ``deadline`` passes; the
    ones still running then."""
    while True:
        left = [p for p in others if _running(p)]
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                left.append(psutil.Process(proc.pid))
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def stop_tree(
    proc: subprocess.Popen, grace_s: float = 10.0, *, name: str = "", known: Iterable[psutil.Process] = ()
) -> int | None:
    """Stop ``proc`` (a process-group leader started with ``start_new_session=True``), its group,
    all its descendants and the ``known`` ones seen earlier (e.g. workers that later left its tree):
    SIGTERM to all, SIGKILL to whatever still runs ``grace_s`` later, then wait (bounded) until
    all are gone. Returns the leader's exit code."""
    who = name or f"pid {proc.pid}"
    found = {p.pid: p for p in known}
    found.update((p.pid, p) for p in _tree(proc))  # before poll() below may reap the leader
    others = [p for pid, p in found.items() if pid != proc.pid]
    leader_ours = proc.poll() is None
    if leader_ours:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    _signal_all(others, signal.SIGTERM)
    alive = _wait_gone(proc, others, time.monotonic() + grace_s)
    if alive:
        logger.warning(
            "%s: %s still running %.1f s after SIGTERM; killing", who, [p.pid for p in alive], grace_s
        )
        if proc.poll() is None:
            # Until the leader is reaped its PID, hence the group id, is ours.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        _signal_all([p for p in alive if p.pid != proc.pid], signal.SIGKILL)
        survivors = _wait_gone(proc, others, time.monotonic() + KILL_WAIT_S)
        if survivors:
            logger.error("%s: %s survived SIGKILL", who, [p.pid for p in survivors])
    return proc.returncode


# ----------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------


def log_tail(path: str | os.PathLike, n_lines: int = 60, max_chars: int = 8000) -> str:
    """The last lines of a log file, framed for an error message."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * max_chars))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"--- (no log at {path}: {e}) ---"
    tail = "\n".join(text.splitlines()[-n_lines:])[-max_chars:]
    return f"--- last lines of {path} ---\n{tail}\n--- end of {path} ---"


def first_traceback(path: str | os.PathLike, max_lines: int = 50) -> str:
    """The first traceback in a log file, framed, or "" if it holds none. A server whose engine
    core fails to start logs the root cause there; the tail only shows the front end's echo."""
    try:
        lines = Path(path).read_text("utf-8", "replace").splitlines()
    except OSError:
        return ""
    # The log is appended to at every start ("### <time> <name>: <argv>"): this start's part only.
    begin = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("### ")), 0)
    start = next(
        (i for i in range(begin, len(lines)) if "Traceback (most recent call last)" in lines[i]), None
    )
    if start is None:
        return ""
    block = lines[max(begin, start - 3):start + max_lines]
    return f"--- first traceback in {path} ---\n" + "\n".join(block) + "\n--- end of first traceback ---"


# ----------------------------------------------------------------------------------------------
# one server
# ----------------------------------------------------------------------------------------------

_live: set[ServerProcess] = set()
_live_lock = threading.Lock()


def _answers_200(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass(eq=False)
class ServerProcess:
    """One server subprocess (its own process group) with a log file and an HTTP port."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    cwd: Path | None = None
    health_path: str = "/health"
    host: str = HOST
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Descendants seen while it started (engine core, workers): stopped even if they leave its tree.
    seen: dict[int, psutil.Process] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> ServerProcess:
        if self.proc is not None:
            raise ServerError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"### {time.strftime('%H:%M:%S')} {self.name}: {' '.join(self.argv)}\n".encode())
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches engine core and workers
            )
        finally:
            log.close()
        self.started_at = time.monotonic()
        with _live_lock:
            _live.add(self)
        logger.info(
            "started %s (pid %d) on port %d, log %s", self.name, self.proc.pid, self.port, self.log_path
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll_ready(self) -> bool:
        """One readiness check: True once ``health_path`` answered 200. Raises :class:`ServerError`
        (with the log tail, after stopping what is left) if the process has exited."""
        if self.proc is None:
            raise ServerError(f"{self.name} not started")
        if self.ready_after_s is not None:
            return True
        for p in children(self.proc):
            self.seen.setdefault(p.pid, p)
        if not self.alive():
            rc = self.proc.returncode
            self.stop()
            raise ServerError(f"{self.name} exited with code {rc} before it was ready\n"
                              f"{first_traceback(self.log_path)}\n{self.log_tail()}")
        if _answers_200(self.url + self.health_path, timeout=2.0):
            self.ready_after_s = time.monotonic() - self.started_at
            logger.info("%s ready after %.1f s", self.name, self.ready_after_s)
            return True
        return False

    def wait_ready(self, deadline: float) -> float:
        """Poll until ready or ``deadline`` (a ``time.monotonic()`` value) passes. Returns seconds
        since start. On failure the server is stopped and :class:`ServerError` carries its log tail."""
        wait_all_ready([self], deadline=deadline)
        assert self.ready_after_s is not None
        return self.ready_after_s

    def stop(self, grace_s: float = 10.0) -> int | None:
        """Stop the whole process tree (:func:`stop_tree`). Idempotent; returns the exit code."""
        with _live_lock:
            _live.discard(self)
        if self.proc is None:
            return None
        return stop_tree(self.proc, grace_s, name=self.name, known=list(self.seen.values()))

    def log_tail(self, n_lines: int = 60, max_chars: int = 8000) -> str:
        return log_tail(self.log_path, n_lines=n_lines, max_chars=max_chars)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    with _live_lock:
        servers = list(_live)
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop(grace_s=5.0)


atexit.register(stop_all)


# ----------------------------------------------------------------------------------------------
# several servers
# ----------------------------------------------------------------------------------------------


def wait_all_ready(
    servers: Sequence[ServerProcess], timeout_s: float | None = None, *, deadline: float | None = None
) -> dict[str, float]:
    """Wait until every server is ready, polling them in turn (they start in parallel, and each one's
    ``ready_after_s`` is measured on its own). On any failure or at the deadline, stop them all and
    raise :class:`ServerError` with the log tail of each server that is not ready."""
    if deadline is None:
        deadline = time.monotonic() + (START_DEADLINE_S if timeout_s is None else timeout_s)
    try:
        while True:
            pending = [s for s in servers if not s.poll_ready()]
            if not pending:
                return {s.name: s.ready_after_s for s in servers}
            if time.monotonic() >= deadline:
                tails = "\n".join(s.log_tail(n_lines=40) for s in pending)
                raise ServerError(
                    f"not ready by the deadline: {', '.join(s.name for s in pending)} "
                    f"(after {time.monotonic() - min(s.started_at for s in pending):.0f} s)\n{tails}"
                )
            time.sleep(0.5)
    except BaseException:
        for s in servers:
            s.stop()
        raise


@contextlib.contextmanager
def running(*servers: ServerProcess, timeout_s: float = START_DEADLINE_S) -> Iterator[tuple]:
    """Start the given (not yet started) servers together, wait for all, stop all on exit."""
    try:
        for s in servers:
            if s.proc is None:
                s.start()
        wait_all_ready(servers, timeout_s)
        yield servers
    finally:
        for s in servers:
            s.stop()
