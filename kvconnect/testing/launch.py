"""Launch recipes for the servers under test: the command line and environment of a vLLM OpenAI
server (single instance, a P/D prefill or decode, with any ``--kv-transfer-config``), of
``vllm-router`` in P/D mode, and a whole prefill + decode + router deployment.

* :func:`vllm_server` runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command
  of the CPU wheel is broken) with the settings that make a tiny model start fast on CPU.
* :func:`router_server` runs ``vllm-router --vllm-pd-disaggregation`` in front of them.
* :func:`pd_deployment` starts prefill (core 0), decode (core 1) and the router, stops all on exit.

Each recipe returns a :class:`~kvconnect.testing.procs.ServerProcess` (not started); starting,
waiting and stopping are :mod:`.procs`'s job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvconnect.testing.ports import free_port
from kvconnect.testing.procs import HOST, ServerProcess, running
from kvconnect.ucx_env import apply_ucx_defaults

DEFAULT_MODEL_NAME = "tiny"
VLLM_START_DEADLINE_S = 240.0
ROUTER_START_DEADLINE_S = 60.0

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
    :func:`~kvconnect.testing.procs.running`; :func:`start_vllm` does both.

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
    if (
        nixl_side_channel_port is not None
    ):  # vLLM's own NixlConnector: kvconnect's agents apply these themselves
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
