"""A Mooncake Store for tests and demos: ``mooncake_master`` plus one standalone memory holder
(``mooncake_client --global_segment_size=...``), both on 127.0.0.1 and free ports, each its own
:class:`~kvconnect.testing.procs.ServerProcess` (own process group, log file, stopped at exit).

The master holds only metadata; objects live in the holder's memory, so they outlive the
engines that stored them. ``metadata="http"`` runs the master's HTTP metadata server too
(it binds every interface whatever host it is given, so the default is ``P2PHANDSHAKE``).
Mooncake's transfer engine in every party also listens on all interfaces (not configurable in
0.3.13); every address kvconnect gives it or connects to is 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvconnect.testing.ports import free_port
from kvconnect.testing.procs import HOST, ServerError, ServerProcess

START_DEADLINE_S = 30.0


def _program(name: str) -> str:
    """``mooncake_master`` / ``mooncake_client`` next to this interpreter, else on PATH."""
    cand = Path(sys.executable).with_name(name)
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found is None:
        raise ServerError(f"{name} not found: pip install 'kvconnect[mooncake]'")
    return found


class _TcpReady(ServerProcess):
    """Ready once its TCP port accepts a connection (the holder has no HTTP endpoint by default)."""

    def poll_ready(self) -> bool:
        if self.ready_after_s is not None:
            return True
        if not self.alive():
            rc = self.proc.returncode if self.proc else None
            self.stop()
            raise ServerError(f"{self.name} exited with code {rc} before it was ready\n{self.log_tail()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                pass
        except OSError:
            return False
        self.ready_after_s = time.monotonic() - self.started_at
        return True


@dataclass
class MooncakeStore:
    """Ports and processes of one test store. ``config()`` is a kvconnect backend entry for it."""

    log_dir: Path
    segment_bytes: int = 512 << 20
    metadata: str = "p2p"  # or "http"
    rpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    holder_port: int = field(default_factory=free_port)
    master: ServerProcess | None = None
    holder: ServerProcess | None = None

    @property
    def master_address(self) -> str:
        return f"{HOST}:{self.rpc_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://{HOST}:{self.http_port}/metadata" if self.metadata == "http" else "P2PHANDSHAKE"

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"backend": "mooncake", "master_server_address": self.master_address,
                "metadata_server": self.metadata_server, **extra}

    def _env(self) -> dict[str, str]:
        return {**os.environ, "MC_TCP_BIND_ADDRESS": HOST}

    def start_master(self) -> ServerProcess:
        argv = [_program("mooncake_master"), f"--rpc_address={HOST}", f"--rpc_port={self.rpc_port}",
                f"--metrics_host={HOST}", f"--metrics_port={self.metrics_port}",
                "--enable_metric_reporting=false", "--logtostderr"]
        if self.metadata == "http":
            argv += ["--enable_http_metadata_server=true", f"--http_metadata_server_host={HOST}",
                     f"--http_metadata_server_port={self.http_port}"]
        self.master = ServerProcess("mooncake_master", argv, self._env(), self.metrics_port,
                                    self.log_dir / "mooncake_master.log")
        self.master.start().wait_ready(time.monotonic() + START_DEADLINE_S)
        return self.master

    def start_holder(self) -> ServerProcess:
        argv = [_program("mooncake_client"), f"--host={HOST}", f"--port={self.holder_port}",
                f"--master_server_address={self.master_address}",
                f"--metadata_server={self.metadata_server}", "--protocol=tcp",
                f"--global_segment_size={self.segment_bytes}", "--logtostderr"]
        self.holder = _TcpReady("mooncake_holder", argv, self._env(), self.holder_port,
                                self.log_dir / "mooncake_holder.log")
        self.holder.start().wait_ready(time.monotonic() + START_DEADLINE_S)
        return self.holder

    def start(self) -> MooncakeStore:
        self.start_master()
        self.start_holder()
        return self

    def kill(self) -> None:
        """Both processes, at once (SIGKILL), as a crash would."""
        for p in (self.holder, self.master):
            if p is not None and p.proc is not None and p.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, 9)
        self.stop()

    def stop(self) -> None:
        for p in (self.holder, self.master):
            if p is not None:
                p.stop(grace_s=5.0)
        self.holder = self.master = None


@contextlib.contextmanager
def mooncake_store(log_dir: str | os.PathLike, **kw: Any) -> Iterator[MooncakeStore]:
    st = MooncakeStore(Path(log_dir), **kw)
    try:
        yield st.start()
    finally:
        st.stop()
