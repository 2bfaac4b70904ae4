"""Real engine servers as subprocesses, for end-to-end tests and ``kvconnect demo``.

* :func:`start_vllm` runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command
  of the CPU wheel is broken) with the settings that make a tiny model start fast on CPU.
* :func:`start_router` runs ``vllm-router`` in P/D mode in front of prefill and decode servers.
* :func:`completion`, :func:`chat`, with ``stream=True`` or not, are greedy HTTP clients that
  return the generated text and token ids; :func:`get_metrics` / :func:`metric_value` read
  Prometheus ``/metrics``.

Every server runs in its own process group, writes its output to a log file (whose tail is put into
every error), is polled for readiness on ``/health`` until a deadline, and is stopped by killing its
whole process group — from the context manager, :func:`stop_all`, or at interpreter exit, so a
failing test cannot leave engines behind. Only the standard library is used (``psutil`` optionally,
to also reap children that left the process group).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvconnect.ucx_env import apply_ucx_defaults

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_MODEL_NAME = "tiny"
VLLM_START_DEADLINE_S = 240.0
ROUTER_START_DEADLINE_S = 60.0
REQUEST_TIMEOUT_S = 120.0

# Environment for every vLLM server: small CPU KV cache, loopback only, no telemetry, no hub.
VLLM_BASE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": HOST,
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# What vLLM's NixlConnector needs on a CPU-only host (the side-channel port is added per server).
NIXL_CPU_ENV = {
    "UCX_NET_DEVICES": "lo",
    "UCX_LOG_LEVEL": "error",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": HOST,
}


class ServerError(RuntimeError):
    """A server failed to start, died, or did not answer in time. The message holds its log tail."""


# ----------------------------------------------------------------------------------------------
# ports
# ----------------------------------------------------------------------------------------------

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports bound to 0 and for outgoing connections."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports(n: int) -> range:
    """Where test ports are drawn from: below the ephemeral range. A port found free by binding
    to 0 lies inside it, where any process's outgoing connection or own bind-to-0 (vLLM's
    internal sockets, on servers that start for minutes) may take it before our server binds it."""
    eph_lo, eph_hi = _ephemeral_range()
    if eph_lo - 10000 >= 1000 + n:
        return range(10000, eph_lo - n)
    return range(eph_hi + 1, 65535 - n)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A TCP port that is free now, outside the ephemeral range, and not handed out before by
    this process."""
    return free_port_range(1, host)


def free_port_range(n: int, host: str = HOST) -> int:
    """A base port with ``n`` consecutive ports free after it (e.g. a side channel for each TP
    rank at ``base + rank``), none handed out before by this process."""
    candidates = _candidate_ports(n)
    with _port_lock:
        for _ in range(500):
            base = random.choice(candidates)
            ports = range(base, base + n)
            if any(p in _handed_out for p in ports):
                continue
            if all(_bindable(host, p) for p in ports):
                _handed_out.update(ports)
                return base
    raise ServerError(f"could not find {n} consecutive free ports in {candidates}")


# ----------------------------------------------------------------------------------------------
# processes
# ----------------------------------------------------------------------------------------------

_live: set[ServerProcess] = set()
_live_lock = threading.Lock()


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

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- life cycle ------------------------------------------------------------------------

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
                start_new_session=True,  # own process group: stop() kills engine core and workers too
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
        if not self.alive():
            rc = self.proc.returncode
            self.stop()
            raise ServerError(f"{self.name} exited with code {rc} before it was ready\n"
                              f"{first_traceback(self.log_path)}\n{self.log_tail()}")
        if _http_ok(self.url + self.health_path, timeout=2.0):
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
        """Terminate the whole process group (SIGTERM, then SIGKILL after ``grace_s``), then any
        descendant still running (also ones that left the group). Idempotent."""
        with _live_lock:
            _live.discard(self)
        proc = self.proc
        if proc is None:
            return None
        # Snapshot the children (engine core, workers) while the leader still lives; psutil checks
        # each one's identity (creation time) before signalling, so a reused PID is never hit.
        descendants = _descendants(proc.pid)
        if proc.poll() is None:
            # The leader is alive (not reaped), so its process-group id is certainly ours.
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit after SIGTERM in %.0f s; killing", self.name, grace_s)
                _signal_group(proc.pid, signal.SIGKILL)
        elif descendants is None:
            _signal_group(proc.pid, signal.SIGKILL)  # no psutil: best effort on the group
        for child in descendants or ():
            with contextlib.suppress(Exception):
                if child.is_running():
                    child.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) survived SIGKILL", self.name, proc.pid)
        return proc.returncode

    def log_tail(self, n_lines: int = 60, max_chars: int = 8000) -> str:
        return log_tail(self.log_path, n_lines=n_lines, max_chars=max_chars)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _descendants(pid: int) -> list | None:
    """All descendants as psutil objects; None when psutil is not installed."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


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
    start = next((i for i in range(begin, len(lines)) if "Traceback (most recent call last)" in lines[i]), None)
    if start is None:
        return ""
    block = lines[max(begin, start - 3):start + max_lines]
    return f"--- first traceback in {path} ---\n" + "\n".join(block) + "\n--- end of first traceback ---"


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    with _live_lock:
        servers = list(_live)
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop(grace_s=5.0)


atexit.register(stop_all)


def wait_all_ready(
    servers: Sequence[ServerProcess], timeout_s: float | None = None, *, deadline: float | None = None
) -> dict[str, float]:
    """Wait until every server is ready, polling them in turn (they start in parallel, and each one's
    ``ready_after_s`` is measured on its own). On any failure or at the deadline, stop them all and
    raise :class:`ServerError` with the log tail of each server that is not ready."""
    if deadline is None:
        deadline = time.monotonic() + (VLLM_START_DEADLINE_S if timeout_s is None else timeout_s)
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
def running(*servers: ServerProcess, timeout_s: float = VLLM_START_DEADLINE_S) -> Iterator[tuple]:
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


# ----------------------------------------------------------------------------------------------
# vLLM
# ----------------------------------------------------------------------------------------------


def vllm_server(
    model_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    name: str = "vllm",
    port: int | None = None,
    block_size: int | None = 32,
    cpus: str | None = None,
    kv_transfer_config: Mapping[str, Any] | str | None = None,
    nixl_side_channel_port: int | None = None,
    served_model_name: str = DEFAULT_MODEL_NAME,
    max_model_len: int = 512,
    dtype: str = "float32",
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> ServerProcess:
    """Describe (not start) a vLLM OpenAI server for ``model_dir``. Call ``.start()`` or use
    :func:`running`; :func:`start_vllm` does both.

    ``workdir`` receives the log, ``VLLM_CACHE_ROOT`` and ``TMPDIR``. ``cpus`` sets
    ``VLLM_CPU_OMP_THREADS_BIND`` (e.g. ``"0"`` and ``"1"`` for two one-core instances; default all
    cores). ``block_size`` must be a multiple of 32 on CPU; pass ``None`` for MLA models (vLLM forces
    16). ``kv_transfer_config`` is a dict or JSON string for ``--kv-transfer-config``; when
    ``nixl_side_channel_port`` is given, the NIXL-on-CPU environment is added too.
    """
    workdir = Path(workdir)
    port = port or free_port()
    if cpus is None:
        cpus = f"0-{max(0, (os.cpu_count() or 1) - 1)}"
    env = dict(os.environ)
    env.update(VLLM_BASE_ENV)
    cache_root = workdir / "vllm_cache" / name
    tmp = workdir / "tmp" / name
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "VLLM_CPU_OMP_THREADS_BIND": cpus,
            "VLLM_CACHE_ROOT": str(cache_root),
            "TMPDIR": str(tmp),
        }
    )
    if nixl_side_channel_port is not None:
        env.update(NIXL_CPU_ENV)
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(nixl_side_channel_port)
    if extra_env:
        env.update(extra_env)
    if nixl_side_channel_port is not None:  # vLLM's own NixlConnector: kvconnect's agents apply these themselves
        apply_ucx_defaults(env)
    argv = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        HOST,
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        dtype,
        "--seed",
        "0",
    ]
    if block_size is not None:
        argv += ["--block-size", str(block_size)]
    if kv_transfer_config is not None:
        if not isinstance(kv_transfer_config, str):
            kv_transfer_config = json.dumps(kv_transfer_config)
        argv += ["--kv-transfer-config", kv_transfer_config]
    argv += list(extra_args)
    return ServerProcess(
        name=name,
        argv=argv,
        env=env,
        port=port,
        log_path=workdir / "logs" / f"{name}.log",
        cwd=workdir,
        extra={"model_dir": str(model_dir), "nixl_side_channel_port": nixl_side_channel_port},
    )


def start_vllm(*args, timeout_s: float = VLLM_START_DEADLINE_S, wait: bool = True, **kwargs) -> ServerProcess:
    """:func:`vllm_server` + start (+ wait for ``/health`` unless ``wait=False``)."""
    server = vllm_server(*args, **kwargs).start()
    if wait:
        server.wait_ready(time.monotonic() + timeout_s)
    return server


def nixl_kv_transfer_config(**extra: Any) -> dict[str, Any]:
    """vLLM's own NixlConnector, both roles, host-memory buffers (the CPU-worker set-up)."""
    cfg: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    cfg.update(extra)
    return cfg


# ----------------------------------------------------------------------------------------------
# vllm-router
# ----------------------------------------------------------------------------------------------


def _router_executable() -> list[str]:
    exe = Path(sys.executable).parent / "vllm-router"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("vllm-router")
    if found:
        return [found]
    return [sys.executable, "-m", "vllm_router.launch_router"]


def router_server(
    prefill_urls: Sequence[str] | str,
    decode_urls: Sequence[str] | str,
    workdir: str | os.PathLike,
    *,
    name: str = "router",
    port: int | None = None,
    policy: str = "round_robin",
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Describe (not start) ``vllm-router --vllm-pd-disaggregation`` in front of the given servers.

    The Prometheus port (which would default to a fixed 29000) gets a free port too.
    """
    if isinstance(prefill_urls, str):
        prefill_urls = [prefill_urls]
    if isinstance(decode_urls, str):
        decode_urls = [decode_urls]
    workdir = Path(workdir)
    port = port or free_port()
    argv = _router_executable() + [
        "--host",
        HOST,
        "--port",
        str(port),
        "--vllm-pd-disaggregation",
        "--policy",
        policy,
        "--prometheus-host",
        HOST,
        "--prometheus-port",
        str(free_port()),
        "--worker-startup-check-interval",
        "1",
    ]
    for url in prefill_urls:
        argv += ["--prefill", url]
    for url in decode_urls:
        argv += ["--decode", url]
    argv += list(extra_args)
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if extra_env:
        env.update(extra_env)
    return ServerProcess(
        name=name, argv=argv, env=env, port=port, log_path=workdir / "logs" / f"{name}.log", cwd=workdir
    )


def start_router(
    *args, timeout_s: float = ROUTER_START_DEADLINE_S, wait: bool = True, **kwargs
) -> ServerProcess:
    """:func:`router_server` + start (+ wait for ``/health``)."""
    server = router_server(*args, **kwargs).start()
    if wait:
        server.wait_ready(time.monotonic() + timeout_s)
    return server


# ----------------------------------------------------------------------------------------------
# a whole P/D deployment
# ----------------------------------------------------------------------------------------------


@dataclass
class PDDeployment:
    prefill: ServerProcess
    decode: ServerProcess
    router: ServerProcess
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.router.url


@contextlib.contextmanager
def pd_deployment(
    model_dir: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    kv_transfer_config: Mapping[str, Any] | str | None = None,
    decode_kv_transfer_config: Mapping[str, Any] | str | None = None,
    nixl_env: bool = True,
    block_size: int | None = 32,
    prefill_env: Mapping[str, str] | None = None,
    decode_env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    router_args: Sequence[str] = (),
    timeout_s: float = VLLM_START_DEADLINE_S,
) -> Iterator[PDDeployment]:
    """Prefill (core 0) + decode (core 1) vLLM servers started in parallel, then ``vllm-router`` in
    front of them; everything is stopped on exit. ``kv_transfer_config`` defaults to vLLM's own
    NixlConnector (:func:`nixl_kv_transfer_config`); ``decode_kv_transfer_config`` defaults to the
    same. With ``nixl_env`` each server gets the NIXL-on-CPU environment and its own side-channel
    port. ``timings`` holds the start-up times."""
    cfg = nixl_kv_transfer_config() if kv_transfer_config is None else kv_transfer_config
    dcfg = cfg if decode_kv_transfer_config is None else decode_kv_transfer_config
    common = dict(block_size=block_size, extra_args=extra_args)
    prefill = vllm_server(
        model_dir,
        workdir,
        name="prefill",
        cpus="0",
        kv_transfer_config=cfg,
        nixl_side_channel_port=free_port() if nixl_env else None,
        extra_env=prefill_env,
        **common,
    )
    decode = vllm_server(
        model_dir,
        workdir,
        name="decode",
        cpus="1" if (os.cpu_count() or 1) > 1 else "0",
        kv_transfer_config=dcfg,
        nixl_side_channel_port=free_port() if nixl_env else None,
        extra_env=decode_env,
        **common,
    )
    t0 = time.perf_counter()
    with running(prefill, decode, timeout_s=timeout_s):
        timings = {
            "servers_start_s": time.perf_counter() - t0,
            "prefill_start_s": prefill.ready_after_s or 0.0,
            "decode_start_s": decode.ready_after_s or 0.0,
        }
        router = router_server(prefill.url, decode.url, workdir, extra_args=router_args).start()
        with router:
            router.wait_ready(time.monotonic() + ROUTER_START_DEADLINE_S)
            timings["router_start_s"] = router.ready_after_s or 0.0
            yield PDDeployment(prefill=prefill, decode=decode, router=router, timings=timings)


# ----------------------------------------------------------------------------------------------
# HTTP clients
# ----------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What one request produced."""

    text: str
    token_ids: list[int] | None
    prompt_token_ids: list[int] | None
    finish_reason: str | None
    latency_s: float
    first_chunk_s: float | None = None  # streaming: time to the first content chunk
    kv_transfer_params: dict | None = None
    raw: Any = None


def _http_ok(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def post_json(url: str, body: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """POST JSON, return the decoded JSON answer; HTTP errors carry the response body."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:2000]
        raise ServerError(f"POST {url} -> HTTP {e.code}: {detail}") from e


def _iter_sse(url: str, body: Mapping[str, Any], timeout: float) -> Iterator[dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        method="POST",
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:2000]
        raise ServerError(f"POST {url} (stream) -> HTTP {e.code}: {detail}") from e
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(f"stream from {url} reported an error: {chunk['error']}")
            yield chunk


def _request_body(
    model: str, max_tokens: int, extra: Mapping[str, Any] | None, stream: bool, ignore_eos: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 0,
        "ignore_eos": ignore_eos,  # a random model may emit EOS early; keep lengths fixed
        "return_token_ids": True,
        "stream": stream,
    }
    if extra:
        body.update(extra)
    return body


def completion(
    base_url: str,
    prompt: str | list[int],
    *,
    max_tokens: int = 16,
    stream: bool = False,
    model: str = DEFAULT_MODEL_NAME,
    ignore_eos: bool = True,
    extra: Mapping[str, Any] | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> Generation:
    """Greedy ``/v1/completions``; returns text and generated token ids."""
    body = _request_body(model, max_tokens, extra, stream, ignore_eos)
    body["prompt"] = prompt
    url = base_url.rstrip("/") + "/v1/completions"
    t0 = time.perf_counter()
    if not stream:
        r = post_json(url, body, timeout)
        ch = r["choices"][0]
        return Generation(
            text=ch.get("text") or "",
            token_ids=ch.get("token_ids"),
            prompt_token_ids=ch.get("prompt_token_ids"),
            finish_reason=ch.get("finish_reason"),
            latency_s=time.perf_counter() - t0,
            kv_transfer_params=r.get("kv_transfer_params"),
            raw=r,
        )
    return _collect_stream(url, body, timeout, t0, chat=False)


def chat(
    base_url: str,
    messages: Sequence[Mapping[str, str]] | str,
    *,
    max_tokens: int = 16,
    stream: bool = False,
    model: str = DEFAULT_MODEL_NAME,
    ignore_eos: bool = True,
    extra: Mapping[str, Any] | None = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> Generation:
    """Greedy ``/v1/chat/completions``; a plain string is sent as one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    body = _request_body(model, max_tokens, extra, stream, ignore_eos)
    body["messages"] = list(messages)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    t0 = time.perf_counter()
    if not stream:
        r = post_json(url, body, timeout)
        ch = r["choices"][0]
        return Generation(
            text=(ch.get("message") or {}).get("content") or "",
            token_ids=ch.get("token_ids"),
            prompt_token_ids=r.get("prompt_token_ids") or ch.get("prompt_token_ids"),
            finish_reason=ch.get("finish_reason"),
            latency_s=time.perf_counter() - t0,
            kv_transfer_params=r.get("kv_transfer_params"),
            raw=r,
        )
    return _collect_stream(url, body, timeout, t0, chat=True)


def _collect_stream(url: str, body: dict, timeout: float, t0: float, *, chat: bool) -> Generation:
    texts: list[str] = []
    token_ids: list[int] = []
    saw_ids = False
    prompt_ids = None
    finish = None
    first = None
    kv_params = None
    n_chunks = 0
    for chunk in _iter_sse(url, body, timeout):
        n_chunks += 1
        if chunk.get("prompt_token_ids") is not None:
            prompt_ids = chunk["prompt_token_ids"]
        if chunk.get("kv_transfer_params") is not None:
            kv_params = chunk["kv_transfer_params"]
        for ch in chunk.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
            if ch.get("prompt_token_ids") is not None:
                prompt_ids = ch["prompt_token_ids"]
            ids = ch.get("token_ids")
            if ids is not None:
                saw_ids = True
                token_ids.extend(ids)
            if (piece or ids) and first is None:
                first = time.perf_counter() - t0
            if piece:
                texts.append(piece)
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
    return Generation(
        text="".join(texts),
        token_ids=token_ids if saw_ids else None,
        prompt_token_ids=prompt_ids,
        finish_reason=finish,
        latency_s=time.perf_counter() - t0,
        first_chunk_s=first,
        kv_transfer_params=kv_params,
        raw={"chunks": n_chunks},
    )


# ----------------------------------------------------------------------------------------------
# Prometheus metrics
# ----------------------------------------------------------------------------------------------

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get_metrics(base_url: str, timeout: float = 10.0) -> Metrics:
    """Fetch ``/metrics`` and parse the Prometheus text format into
    ``{(sample_name, sorted_label_items): value}``."""
    return parse_prometheus(http_get(base_url.rstrip("/") + "/metrics", timeout=timeout))


def parse_prometheus(text: str) -> Metrics:
    out: Metrics = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "{" in line:
                name, rest = line.split("{", 1)
                labels_s, value_s = rest.rsplit("}", 1)
                labels = tuple(sorted(_parse_labels(labels_s).items()))
            else:
                name, value_s = line.split(None, 1)
                labels = ()
            value = float(value_s.split()[0])
        except (ValueError, IndexError):
            continue
        out[(name.strip(), labels)] = value
    return out


def _parse_labels(s: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i, n = 0, len(s)
    while i < n:
        eq = s.find("=", i)
        if eq < 0:
            break
        key = s[i:eq].strip().lstrip(",").strip()
        j = eq + 1
        if j >= n or s[j] != '"':
            break
        j += 1
        val = []
        while j < n and s[j] != '"':
            if s[j] == "\\" and j + 1 < n:
                j += 1
                val.append({"n": "\n"}.get(s[j], s[j]))
            else:
                val.append(s[j])
            j += 1
        labels[key] = "".join(val)
        i = j + 1
    return labels


class MetricMissing(KeyError):
    """The server exposes no sample of that metric with those labels (renamed, never declared, or
    the wrong server): an error, so that a check such as ``== 0`` cannot pass on a metric that is
    not there."""


def metric_value(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of all samples called ``name`` whose labels include ``labels``. Counters are exposed
    as ``<name>_total``; pass either spelling. Raises :class:`MetricMissing` when there is none."""
    names = {name, name + "_total"} if not name.endswith("_total") else {name}
    want = set(labels.items())
    found = [v for (n, lab), v in metrics.items() if n in names and want <= set(lab)]
    if not found:
        near = sorted({n for (n, _) in metrics if n.split("_total")[0] == name.split("_total")[0]})
        raise MetricMissing(f"no sample of {name!r} with labels {labels or '{}'} on this server"
                            + (f" (samples of {near} exist with other labels)" if near else ""))
    return sum(found)


#: vLLM's metrics that read 0 on a server holding no request and no KV block.
LEFT_METRICS = ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting")


def left_on_server(url: str) -> dict[str, float]:
    """What a vLLM server still holds: each of :data:`LEFT_METRICS` (all 0 once it is idle)."""
    m = get_metrics(url)
    return {k: metric_value(m, f"vllm:{k}") for k in LEFT_METRICS}


def metric_names(metrics: Metrics, prefix: str = "") -> list[str]:
    return sorted({n for (n, _) in metrics if n.startswith(prefix)})


# ----------------------------------------------------------------------------------------------
# timing helper
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed(results: dict[str, float], key: str) -> Iterator[None]:
    """``with timed(t, "start"): ...`` stores the elapsed seconds in ``t["start"]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        results[key] = time.perf_counter() - t0


def urls(servers: Iterable[ServerProcess]) -> list[str]:
    return [s.url for s in servers]
