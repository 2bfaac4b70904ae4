"""vLLM general-plugin entry point: registers the ``KVConnect`` connector name in every vLLM
process, so ``"kv_connector": "KVConnect"`` works without a module path. Importing this module
must stay cheap: vLLM loads it in each process at start."""

from __future__ import annotations

CONNECTOR_NAME = "KVConnect"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # Plugins can be loaded more than once per process; registering twice raises in vLLM.
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvconnect.adapters.vllm", "KVConnect")
