"""Pure translations from vLLM objects to kvconnect's neutral API (no transfer logic here).

Kept apart from the connector class so each translation is testable on plain objects: anything
with the same attribute names works, which is all duck typing asks of vLLM's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView
from kvconnect.errors import LayoutError
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, VLLM_CPU_DIMS, KVLayout

#: vLLM's CPU cache seen as ``[blocks, heads, 2 (K then V), block_size, head_dim]``.
VLLM_CPU_SPLIT_DIMS = ("block", "head", "kv", "token", "feature")

_FINISH = {"length": "length", "stop": "stop", "abort": "abort", "error": "error"}


def finish_reason(request: Any) -> str | None:
    """vLLM's FinishReason (or RequestStatus) as a lower-case word, None while running."""
    get = getattr(request, "get_finished_reason", None)
    reason = get() if callable(get) else None
    if reason is None:
        status = getattr(request, "status", None)
        name = getattr(status, "name", "")
        if name.startswith("FINISHED_"):
            word = name[len("FINISHED_") :].lower()
            return {"length_capped": "length", "aborted": "abort", "ignored": "abort"}.get(word, word)
        return None
    word = str(getattr(reason, "name", reason)).lower()
    return _FINISH.get(word, word)


def request_view(request: Any) -> RequestView:
    """Build the neutral view of a vLLM ``Request`` (references, no copies)."""
    return RequestView(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids or (),
        all_token_ids=getattr(request, "all_token_ids", None),
        block_hashes=getattr(request, "block_hashes", None),
        transfer_params=getattr(request, "kv_transfer_params", None),
        cache_salt=getattr(request, "cache_salt", None),
        finish_reason=finish_reason(request),
    )


def block_ids_of(blocks: Any) -> tuple[list[int], ...]:
    """vLLM ``KVCacheBlocks`` (or a ready tuple of per-group lists) to per-group id lists."""
    if blocks is None:
        return ([],)
    get = getattr(blocks, "get_block_ids", None)
    if callable(get):
        return tuple(list(g) for g in get())
    return tuple(list(g) for g in blocks)


def step_view(scheduler_output: Any) -> StepView:
    """The part of vLLM's ``SchedulerOutput`` that connectors use."""
    step = StepView(
        finished_request_ids=set(scheduler_output.finished_req_ids or ()),
        preempted_request_ids=set(getattr(scheduler_output, "preempted_req_ids", None) or ()),
    )
    ntok: Mapping[str, int] = scheduler_output.num_scheduled_tokens
    for new in scheduler_output.scheduled_new_reqs:
        step.scheduled.append(
            ScheduledRequest(
                request_id=new.req_id,
                new_block_ids=tuple(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
                num_scheduled_tokens=ntok.get(new.req_id, 0),
                is_new=True,
            )
        )
    cached = scheduler_output.scheduled_cached_reqs
    resumed = getattr(cached, "resumed_req_ids", None) or ()
    for i, rid in enumerate(cached.req_ids):
        new_ids = cached.new_block_ids[i]
        step.scheduled.append(
            ScheduledRequest(
                request_id=rid,
                new_block_ids=tuple(new_ids) if new_ids is not None else (),
                num_computed_tokens=cached.num_computed_tokens[i],
                num_scheduled_tokens=ntok.get(rid, 0),
                is_new=rid in resumed,
            )
        )
    return step


def _is_mla(spec: Any) -> bool:
    return "MLA" in type(spec).__name__ or getattr(spec, "head_size_v", None) == 0


def layer_layout(tensor: Any, spec: Any, group: int, kv_layout_hint: str | None = None):
    """Name the dims of one layer's KV tensor from its vLLM spec. Returns ``(tensor, KVLayout)``;
    the tensor may be a view (MLA's size-1 head dim squeezed away)."""
    bs = int(spec.block_size)
    shape = tuple(int(s) for s in tensor.shape)
    if _is_mla(spec):
        if len(shape) == 4 and shape[1] == 1:
            tensor = tensor.squeeze(1)
            shape = tuple(int(s) for s in tensor.shape)
        if len(shape) == 3 and shape[1] == bs:
            return tensor, KVLayout.of_tensor(tensor, MLA_DIMS, group)
        raise LayoutError(f"MLA cache of shape {shape} does not match block size {bs}")
    heads = int(getattr(spec, "num_kv_heads", 0))
    head = int(spec.head_size)
    head_v = int(getattr(spec, "head_size_v", None) or head)
    candidates: list[tuple[tuple[str, ...], tuple[int, ...]]] = [
        (VLLM_CPU_DIMS, (-1, heads, bs, head + head_v)),
    ]
    if head == head_v:
        flash = [(FLASH_NHD_DIMS, (2, -1, bs, heads, head)), (FLASH_HND_DIMS, (2, -1, heads, bs, head)),
                 (("block", "kv", "token", "head", "feature"), (-1, 2, bs, heads, head)),
                 (("block", "kv", "head", "token", "feature"), (-1, 2, heads, bs, head))]
        if kv_layout_hint == "HND":
            flash = [flash[1], flash[0], flash[3], flash[2]]
        candidates += flash
    for dims, want in candidates:
        if len(want) == len(shape) and all(w in (-1, s) for w, s in zip(want, shape)):
            if dims == VLLM_CPU_DIMS and head == head_v and tensor.device.type == "cpu":
                # vLLM's CPU attention keeps, per (block, head), all K rows then all V rows (it views
                # the cache as [B, H, 2*bs, hd]): name that K/V plane so token ranges are right.
                tensor = tensor.view(shape[0], heads, 2, bs, head)
                return tensor, KVLayout.of_tensor(tensor, VLLM_CPU_SPLIT_DIMS, group)
            return tensor, KVLayout.of_tensor(tensor, dims, group)
    # A kernel block size smaller than the manager's shows up as more, smaller blocks.
    raise LayoutError(
        f"cannot name the dims of a KV cache of shape {shape} for {type(spec).__name__} "
        f"(block size {bs}, {heads} KV heads, head size {head}); kvconnect knows "
        "[blocks, heads, block_size, K|V], flash NHD/HND and MLA [blocks, block_size, latent]"
    )


def engine_info(vllm_config: Any, kv_cache_config: Any, tp_rank: int = 0) -> EngineInfo:
    """Static facts about this vLLM instance, for the backends and the compatibility hash."""
    ktc = vllm_config.kv_transfer_config
    model = vllm_config.model_config
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    block_sizes = tuple(int(g.kv_cache_spec.block_size) for g in groups) or (
        int(vllm_config.cache_config.block_size),
    )
    bytes_per_block = sum(len(g.layer_names) * int(g.kv_cache_spec.page_size_bytes) for g in groups)
    specs = [g.kv_cache_spec for g in groups]
    signature = {
        "architecture": str(getattr(model.hf_config, "architectures", None) or model.model),
        "num_layers": sum(len(g.layer_names) for g in groups),
        "kv_groups": [
            [type(s).__name__, int(getattr(s, "head_size", 0)), str(getattr(s, "dtype", "")),
             int(getattr(s, "sliding_window", 0) or 0)]
            for s in specs
        ],
        "total_kv_heads": int(model.get_total_num_kv_heads()),
        "dtype": str(model.dtype),
    }
    return EngineInfo(
        engine_id=str(ktc.engine_id),
        role=str(ktc.kv_role or "kv_both"),
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
        tp_rank=tp_rank,
        block_sizes=block_sizes,
        model_signature=signature,
        dp_rank=int(getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0),
        kv_bytes_per_block=bytes_per_block,
        num_kv_heads=int(model.get_total_num_kv_heads()),
        layer_groups=tuple(tuple(g.layer_names) for g in groups),
    )


def layer_group_index(groups: Sequence[Any]) -> dict[str, tuple[int, Any]]:
    """layer name -> (group index, spec)."""
    out: dict[str, tuple[int, Any]] = {}
    for gi, g in enumerate(groups):
        for name in g.layer_names:
            out[name] = (gi, g.kv_cache_spec)
    return out
