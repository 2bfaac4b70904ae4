"""A real vLLM scheduler-side set-up, as ``kvconnect bench scheduler`` and the vLLM adapter's
hot-path tests use it: the engine config on the tiny local model (``EngineArgs(...)
.create_engine_config()``), a real ``KVCacheConfig`` and vLLM's block hasher, and every connector
built the way vLLM builds it (``KVConnectorFactory.create_connector``)."""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Any

# Scheduler-only use of the engine config: prompts longer than the tiny model's positions are fine.
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
os.environ.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PD_NIXL = {"backend": "nixl"}
#: The reference row of what any P/D connector pays (kvconnect.bench.floor).
FLOOR = "floor: bare P/D protocol"


def connectors(offload_bytes: int) -> dict[str, list[tuple[str, str, str, dict, bool]]]:
    """Workload -> [(label, connector name, kv_role, extra config, is kvconnect)]."""
    off = {"backend": "cpu_offload", "cpu_bytes_to_use": offload_bytes}
    voff = {"cpu_bytes_to_use": offload_bytes}

    def vmulti(role: str) -> dict:
        return {"connectors": [
            {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": nixl_buffer_device()},
            {"kv_connector": "OffloadingConnector", "kv_role": role, "kv_connector_extra_config": voff},
        ]}

    out = {}
    for side, role in (("producer", "kv_producer"), ("consumer", "kv_consumer")):
        out[f"pd_{side}"] = [
            ("kvconnect nixl", "KVConnect", role, dict(PD_NIXL), True),
            ("vLLM NixlConnector", "NixlConnector", role, {}, False),
            (FLOOR, "BareProtocolConnector", role, {}, False),
        ]
        out[f"composed_{side}"] = [
            ("kvconnect nixl+cpu_offload", "KVConnect", role, {"backends": [dict(PD_NIXL), dict(off)]}, True),
            ("vLLM MultiConnector(Nixl+Offloading)", "MultiConnector", role, vmulti(role), False),
        ]
    out["offload"] = [
        ("kvconnect cpu_offload", "KVConnect", "kv_both", dict(off), True),
        ("vLLM OffloadingConnector", "OffloadingConnector", "kv_both", dict(voff), False),
        ("vLLM ExampleConnector", "ExampleConnector", "kv_both", {}, False),
    ]
    return out


def nixl_buffer_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"



@dataclass
class Env:
    """One block size: the engine config, the KV-cache config, the block hasher."""

    block_size: int
    vllm_config: Any
    kv_cache_config: Any
    hasher: Any
    num_blocks: int
    bytes_per_block: int
    #: Every connector is built with vLLM's KV cache events on (a null publisher).
    kv_events: bool = False


def make_env(block_size: int, num_blocks: int, max_model_len: int) -> Env:
    import torch
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

    from kvconnect.testing.tiny_models import cached

    model = cached("llama_gqa")
    ea = EngineArgs(
        model=str(model), max_model_len=max_model_len, block_size=block_size, enforce_eager=True,
        dtype="float32", max_num_seqs=1024, max_num_batched_tokens=max(16384, max_model_len),
        kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both",
                                            kv_buffer_device=nixl_buffer_device()),
    )
    vc = ea.create_engine_config()
    bs = int(vc.cache_config.block_size)
    hf = vc.model_config.hf_config
    head = int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=int(hf.num_key_value_heads), head_size=head,
                             dtype=torch.float32)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(int(hf.num_hidden_layers))]
    page = int(spec.page_size_bytes)
    kcc = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks, layers=[n], layer_stride=0, block_stride=page)
                          for n in names],
        kv_cache_groups=[KVCacheGroupSpec(names, spec)],
    )
    hash_fn = get_hash_fn_by_name(vc.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return Env(bs, vc, kcc, get_request_block_hasher(bs, hash_fn), num_blocks, page * len(names))


def build_connector(env: Env, name: str, role: str, extra: dict) -> Any:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    if name == "KVConnect":
        from kvconnect.adapters.vllm_plugin import register

        register()
    vc = copy.copy(env.vllm_config)
    kw: dict[str, Any] = {"kv_connector": name, "kv_role": role, "kv_connector_extra_config": extra,
                          "engine_id": f"bench-{name}-{role}"}
    if name == "NixlConnector":
        kw["kv_buffer_device"] = nixl_buffer_device()
    if name == "BareProtocolConnector":
        kw["kv_connector_module_path"] = "kvconnect.bench.floor"
    if name == "ExampleConnector":
        kw["kv_connector_extra_config"] = {"shared_storage_path": tempfile.mkdtemp(prefix="kvc-bench-ex-")}
    if name in ("ExampleConnector", "BareProtocolConnector"):
        # Neither supports the hybrid KV-cache manager.
        vc.scheduler_config = copy.copy(vc.scheduler_config)
        vc.scheduler_config.disable_hybrid_kv_cache_manager = True
    vc.kv_transfer_config = KVTransferConfig(**kw)
    if env.kv_events:
        from vllm.config import KVEventsConfig

        vc.kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    return KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, env.kv_cache_config)
