"""The floor of the P/D scheduler half, as a reference row of ``kvconnect bench scheduler``.

``BareProtocolConnector`` does only what every connector speaking vLLM's ``kv_transfer_params``
protocol must do on the scheduler thread, with no validation, no bookkeeping and no failure
handling (not usable for serving -- it has no worker half):

* consumer: offer the prompt as an asynchronous external hit, read the ids of the blocks the
  engine allocated for it (the load needs them), hand them to the workers in the step metadata;
* producer: keep the blocks of a finished request and return their ids in the params.

What it costs is paid by any real P/D connector, vLLM's and kvconnect's alike; the bench prints it
so the ratios to vLLM's NixlConnector can be read against the lowest reachable one.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata


class BareProtocolMetadata(KVConnectorMetadata):
    def __init__(self, loads: list) -> None:
        self.loads = loads


_EMPTY = BareProtocolMetadata([])


class BareProtocolConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._loads: list = []

    # -- scheduler half
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params
        if params and params.get("do_remote_prefill"):
            n = request.num_prompt_tokens - num_computed_tokens
            if n > 0:
                return n, True
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._loads.append((request.request_id, request.kv_transfer_params, blocks.get_block_ids()))

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if not self._loads:
            return _EMPTY
        meta, self._loads = BareProtocolMetadata(self._loads), []
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return False, None
        return True, {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": block_ids,
                      "remote_engine_id": "floor", "remote_host": "127.0.0.1", "remote_port": 1,
                      "remote_request_id": request.request_id, "tp_size": 1}

    # -- worker half: none (a scheduler-only reference)
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        raise NotImplementedError("BareProtocolConnector is a scheduler-side benchmark reference")

    def wait_for_layer_load(self, layer_name: str) -> None:
        raise NotImplementedError("BareProtocolConnector is a scheduler-side benchmark reference")

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        raise NotImplementedError("BareProtocolConnector is a scheduler-side benchmark reference")

    def wait_for_save(self) -> None:
        raise NotImplementedError("BareProtocolConnector is a scheduler-side benchmark reference")
