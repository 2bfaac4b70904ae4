"""One namespace over the server harness, for the e2e tests, ``kvconnect demo`` and ``kvconnect
bench`` that use all of it as ``S``: re-exports only, no code. Each job lives in its own module:

* :mod:`.procs`: a supervised server subprocess (log, readiness deadline, stopped as a tree);
* :mod:`.ports`: free ports outside the ephemeral range;
* :mod:`.launch`: vLLM / vllm-router command lines and environments, a P/D deployment;
* :mod:`.client`: greedy completion / chat clients;
* :mod:`.metrics`: ``/metrics`` read with prometheus_client's parser (a missing metric raises).

New code imports from those modules directly.
"""

from kvconnect.testing.client import REQUEST_TIMEOUT_S, Generation, chat, completion, http_get, post_json
from kvconnect.testing.launch import (
    DEFAULT_MODEL_NAME,
    NIXL_CPU_ENV,
    ROUTER_START_DEADLINE_S,
    VLLM_BASE_ENV,
    VLLM_START_DEADLINE_S,
    PDDeployment,
    nixl_kv_transfer_config,
    pd_deployment,
    router_server,
    start_router,
    start_vllm,
    vllm_server,
)
from kvconnect.testing.metrics import (
    LEFT_METRICS,
    MetricMissing,
    Metrics,
    get_metrics,
    left_on_server,
    metric_value,
    parse_prometheus,
)
from kvconnect.testing.ports import free_port, free_port_range
from kvconnect.testing.procs import (
    HOST,
    ServerError,
    ServerProcess,
    first_traceback,
    log_tail,
    running,
    stop_all,
    wait_all_ready,
)

__all__ = [
    "DEFAULT_MODEL_NAME", "HOST", "LEFT_METRICS", "NIXL_CPU_ENV", "REQUEST_TIMEOUT_S",
    "ROUTER_START_DEADLINE_S", "VLLM_BASE_ENV", "VLLM_START_DEADLINE_S",
    "Generation", "MetricMissing", "Metrics", "PDDeployment", "ServerError", "ServerProcess",
    "chat", "completion", "first_traceback", "free_port", "free_port_range", "get_metrics",
    "http_get", "left_on_server", "log_tail", "metric_value", "nixl_kv_transfer_config",
    "parse_prometheus", "pd_deployment", "post_json", "router_server", "running", "start_router",
    "start_vllm", "stop_all", "vllm_server", "wait_all_ready",
]
