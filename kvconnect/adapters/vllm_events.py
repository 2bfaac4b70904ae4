"""kvconnect's tier events (:mod:`kvconnect.events`) as vLLM KV cache events.

vLLM publishes what the connector's ``take_events`` returns with its own device events (same
ZMQ batch). The block hashes are the engine's own (``request.block_hashes``), converted the way
vLLM converts its device hashes (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, on by default: the low
64 bits of the big-endian hash as an int; else the bytes as they are), so a subscriber joins a
tier's blocks to the device's by hash. The setting is read once per batch: vLLM's own converter
reads the environment on every hash, which was most of the cost of a batch. LoRA and the per-block extra keys
are read from the vLLM request with vLLM's own helpers, as its block pool does for device blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import vllm.envs as vllm_envs
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, to_event_extra_keys

from kvconnect.events import BlocksRemoved, BlocksStored

logger = logging.getLogger(__name__)


def _extra_keys(request: Any, first_block: int, n_blocks: int, block_size: int) -> list | None:
    if request is None:
        return None
    try:
        keys: list = []
        mm_idx = 0
        for i in range(first_block, first_block + n_blocks):
            k, mm_idx = generate_block_hash_extra_keys(request, i * block_size, (i + 1) * block_size, mm_idx)
            keys.append(k)
        return to_event_extra_keys(keys)
    except Exception:  # a missing extra never costs the event itself
        logger.debug("kvconnect: extra keys of request %s not available", getattr(request, "request_id", "?"),
                     exc_info=True)
        return None


_LOW64 = (1 << 64) - 1


def _as_int(h: Any) -> Any:
    return int.from_bytes(h, "big") & _LOW64 if isinstance(h, bytes) else h


def _as_is(h: Any) -> Any:
    return h


def to_vllm_events(events: Iterable[Any]) -> list[KVCacheEvent]:
    out: list[KVCacheEvent] = []
    conv = _as_int if vllm_envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES else _as_is
    for e in events:
        if isinstance(e, BlocksStored):
            req = getattr(e.request, "engine_request", None)
            lora = getattr(req, "lora_request", None)
            parent = e.parent_block_hash
            out.append(BlockStored(
                block_hashes=[conv(h) for h in e.block_hashes],
                parent_block_hash=conv(parent) if parent is not None else None,
                token_ids=list(e.token_ids),
                block_size=e.block_size,
                lora_id=lora.adapter_id if lora else None,
                medium=e.medium,
                lora_name=lora.name if lora else None,
                extra_keys=_extra_keys(req, e.first_block, len(e.block_hashes), e.block_size),
                group_idx=e.group,
                locality=e.locality,
                ownership=e.ownership,
            ))
        elif isinstance(e, BlocksRemoved):
            out.append(BlockRemoved(
                block_hashes=[conv(h) for h in e.block_hashes],
                medium=e.medium,
                group_idx=e.group,
                locality=e.locality,
                ownership=e.ownership,
            ))
        else:
            logger.warning("kvconnect: unknown tier event %s dropped", type(e).__name__)
    return out
