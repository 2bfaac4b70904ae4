"""Pure translations from vLLM objects to kvconnect's neutral API (no transfer logic here).

Kept apart from the connector class so each translation is testable on plain objects: anything
with the same attribute names works, which is all duck typing asks of vLLM's classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from kvconnect.api import EngineInfo, RequestView, ScheduledRequest, StepView
from kvconnect.errors import LayoutError
from kvconnect.layout import FLASH_HND_DIMS, FLASH_NHD_DIMS, MLA_DIMS, VLLM_CPU_DIMS, KVLayout

#: vLLM's CPU cache, per (block, head): the K plane stored transposed, ``[head_dim, block_size]``
#: (feature-major), then the V plane ``[block_size, head_dim]`` (measured with the CPU kernels'
#: ``cpu_attn_reshape_and_cache``). One strided view cannot name both, so each layer is
#: described as two entries, ``<layer>.k`` and ``<layer>.v``; see :func:`layer_entries`.
VLLM_CPU_K_DIMS = ("block", "head", "feature", "token")
VLLM_CPU_V_DIMS = ("block", "head", "token", "feature")

_FINISH = {"length": "length", "stop": "stop", "abort": "abort", "error": "error"}
#: vLLM RequestStatus member -> its finish reason. vLLM derives the reason from the status alone,
#: so each member is named once, not on every finished request. RequestStatus is an IntEnum: its
#: members hash in C, as ints; only vLLM's own members are ever stored (see finish_reason).
_STATUS_WORDS: dict[Any, str | None] = {}
#: vLLM's RequestStatus class, once seen (a plain int equal to a member must not hit the cache)
_STATUS_TYPES: set[type] = set()
_MISS = object()


def finish_reason(request: Any) -> str | None:
    """vLLM's FinishReason (or RequestStatus) as a lower-case word, None while running."""
    status = getattr(request, "status", None)
    word = _STATUS_WORDS.get(status, _MISS) if type(status) in _STATUS_TYPES else _MISS
    if word is not _MISS:
        return word  # type: ignore[return-value]
    word = _finish_reason(request)
    cls = type(status)
    if cls.__name__ == "RequestStatus" and cls.__module__.startswith("vllm.") and len(_STATUS_WORDS) < 64:
        _STATUS_TYPES.add(cls)
        _STATUS_WORDS[status] = word
    return word


def _finish_reason(request: Any) -> str | None:
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


class VllmRequestView(RequestView):
    """The neutral view of a vLLM ``Request``, reading each field from it when asked.

    Built on every scheduler call for every request, so building it must cost next to nothing:
    one object holding the request; most calls read one or two fields (a P/D producer's lookup
    reads only the transfer params). ``with_finish=False`` reports no finish reason (the adapter
    passes it for lookups and allocation notices, where vLLM's request is never finished)."""

    __slots__ = ("_r", "_with_finish")

    def __init__(self, request: Any, with_finish: bool = True) -> None:
        self._r = request
        self._with_finish = with_finish
        # Read by nearly every call: copied into the base class's slots once (a slot read after,
        # not a property call); the other fields are read from the request when asked.
        self.request_id = request.request_id
        self.transfer_params = request.kv_transfer_params  # every vLLM Request sets it (maybe None)

    @property  # type: ignore[override]
    def prompt_token_ids(self) -> Sequence[int]:
        return self._r.prompt_token_ids or ()

    @property  # type: ignore[override]
    def all_token_ids(self) -> Sequence[int] | None:
        return getattr(self._r, "all_token_ids", None)

    @property  # type: ignore[override]
    def block_hashes(self) -> Sequence[bytes] | None:
        return getattr(self._r, "block_hashes", None)

    @property  # type: ignore[override]
    def cache_salt(self) -> str | None:
        return getattr(self._r, "cache_salt", None)

    @property  # type: ignore[override]
    def finish_reason(self) -> str | None:
        return finish_reason(self._r) if self._with_finish else None

    @property
    def num_prompt_tokens(self) -> int:
        return self._r.num_prompt_tokens  # every vLLM Request sets it (prompt embeds too)

    @property
    def engine_request(self) -> Any:
        """vLLM's ``Request`` (the adapter's KV-event builder reads LoRA and extra keys from it)."""
        return self._r


def block_ids_of(blocks: Any) -> tuple[list[int], ...]:
    """vLLM ``KVCacheBlocks`` (or a ready tuple of per-group lists) to per-group id lists."""
    if blocks is None:
        return ([],)
    get = getattr(blocks, "get_block_ids", None)
    if get is not None:
        groups = get()  # vLLM builds a tuple of new lists per call: kept, not copied
        return groups if type(groups) is tuple else tuple(groups)
    return tuple(list(g) for g in blocks)


class LazyBlockIds(Sequence):
    """The per-group block ids of a vLLM ``KVCacheBlocks``, read from it on first use.

    vLLM hands ``update_state_after_alloc`` the request's whole block table as block objects;
    turning it into ids is O(blocks), and most allocation notices (every request a P/D producer or
    a missed lookup sees) never look at them. Reads behave like :func:`block_ids_of`'s tuple."""

    __slots__ = ("_blocks", "_ids")

    def __init__(self, blocks: Any) -> None:
        self._blocks = blocks
        self._ids: tuple[list[int], ...] | None = None

    def _get(self) -> tuple[list[int], ...]:
        ids = self._ids
        if ids is None:
            ids = self._ids = block_ids_of(self._blocks)
        return ids

    def __len__(self) -> int:
        groups = getattr(self._blocks, "blocks", None)
        return len(groups) if isinstance(groups, (tuple, list)) else len(self._get())

    def __getitem__(self, i: Any) -> Any:
        return self._get()[i]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._get())

    def __eq__(self, other: object) -> bool:
        return tuple(self._get()) == (tuple(other) if isinstance(other, Sequence) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LazyBlockIds({self._get()!r})"


def _scheduled(scheduler_output: Any) -> list[ScheduledRequest]:
    out: list[ScheduledRequest] = []
    ntok: Mapping[str, int] = scheduler_output.num_scheduled_tokens
    for new in scheduler_output.scheduled_new_reqs:
        out.append(
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
        out.append(
            ScheduledRequest(
                request_id=rid,
                new_block_ids=tuple(new_ids) if new_ids is not None else (),
                num_computed_tokens=cached.num_computed_tokens[i],
                num_scheduled_tokens=ntok.get(rid, 0),
                is_new=rid in resumed,
            )
        )
    return out


class _LazyStepView(StepView):
    """A :class:`StepView` read from vLLM's ``SchedulerOutput`` only as far as a backend looks:
    the ``scheduled`` list is O(running requests) per step and P/D backends never read it, and
    the finished/preempted sets are copied (vLLM's own are not the backends' to keep) on first read."""

    __slots__ = ("_output", "_built", "_finished", "_preempted")

    def __init__(self, scheduler_output: Any) -> None:
        self._output = scheduler_output
        self._built: list[ScheduledRequest] | None = None
        self._finished: set[str] | None = None
        self._preempted: set[str] | None = None

    @property  # type: ignore[override]
    def scheduled(self) -> list[ScheduledRequest]:
        built = self._built
        if built is None:
            built = self._built = _scheduled(self._output)
        return built

    @scheduled.setter
    def scheduled(self, value: list[ScheduledRequest]) -> None:
        self._built = value

    @property  # type: ignore[override]
    def finished_request_ids(self) -> set[str]:
        if self._finished is None:
            ids = self._output.finished_req_ids
            self._finished = set(ids) if ids else set()
        return self._finished

    @finished_request_ids.setter
    def finished_request_ids(self, value: set[str]) -> None:
        self._finished = value

    @property  # type: ignore[override]
    def preempted_request_ids(self) -> set[str]:
        if self._preempted is None:
            ids = getattr(self._output, "preempted_req_ids", None)
            self._preempted = set(ids) if ids else set()
        return self._preempted

    @preempted_request_ids.setter
    def preempted_request_ids(self, value: set[str]) -> None:
        self._preempted = value


def step_view(scheduler_output: Any) -> StepView:
    """The part of vLLM's ``SchedulerOutput`` that connectors use (each field built on first read)."""
    return _LazyStepView(scheduler_output)


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
                raise LayoutError(
                    "vLLM's CPU KV cache holds a transposed K plane and a V plane per (block, head); "
                    "describe it with layer_entries(), which names them as two entries"
                )
            return tensor, KVLayout.of_tensor(tensor, dims, group)
    # A kernel block size smaller than the manager's shows up as more, smaller blocks.
    raise LayoutError(
        f"cannot name the dims of a KV cache of shape {shape} for {type(spec).__name__} "
        f"(block size {bs}, {heads} KV heads, head size {head}); kvconnect knows "
        "[blocks, heads, block_size, K|V], flash NHD/HND and MLA [blocks, block_size, latent]"
    )


def layer_entries(name: str, tensor: Any, spec: Any, group: int, kv_layout_hint: str | None = None):
    """One vLLM layer as ``[(entry name, tensor view, KVLayout), ...]``: usually one entry (see
    :func:`layer_layout`); vLLM's CPU cache ``[B, H, bs, 2*hd]`` gives two strided views of the
    same memory, ``<name>.k`` (``[B, H, hd, bs]``, feature-major) and ``<name>.v`` (``[B, H, bs, hd]``)."""
    shape = tuple(int(s) for s in tensor.shape)
    heads = int(getattr(spec, "num_kv_heads", 0))
    head = int(getattr(spec, "head_size", 0))
    head_v = int(getattr(spec, "head_size_v", None) or head)
    bs = int(spec.block_size)
    if (
        not _is_mla(spec) and head == head_v and tensor.device.type == "cpu"
        and len(shape) == 4 and shape[1:] == (heads, bs, 2 * head)
    ):
        sb, sh = int(tensor.stride(0)), int(tensor.stride(1))
        if int(tensor.stride(3)) != 1 or int(tensor.stride(2)) != 2 * head or sh < 2 * bs * head:
            raise LayoutError(f"vLLM CPU KV cache of shape {shape} has unexpected strides {tensor.stride()}")
        off = int(tensor.storage_offset())
        k = tensor.as_strided((shape[0], heads, head, bs), (sb, sh, bs, 1), off)
        v = tensor.as_strided((shape[0], heads, bs, head), (sb, sh, head, 1), off + bs * head)
        return [(f"{name}.k", k, KVLayout.of_tensor(k, VLLM_CPU_K_DIMS, group)),
                (f"{name}.v", v, KVLayout.of_tensor(v, VLLM_CPU_V_DIMS, group))]
    view, lay = layer_layout(tensor, spec, group, kv_layout_hint)
    return [(name, view, lay)]


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
        group_kinds=tuple(group_kind(s) for s in specs),
        sliding_windows=tuple(
            int(getattr(s, "sliding_window", 0) or 0) if group_kind(s) == "sliding_window" else 0
            for s in specs
        ),
        # vLLM's BlockPool takes block 0 off its free queue as the null block at start.
        null_block_id=0,
        model_name=str(model.model),
        kv_events=bool(
            getattr(getattr(vllm_config, "kv_events_config", None), "enable_kv_cache_events", False)
        ),
    )


def group_kind(spec: Any) -> str:
    """``full_attention`` or ``sliding_window`` for the KV-cache specs vLLM's hybrid allocator
    manages with its full-attention or sliding-window manager; the spec's class name otherwise
    (subclasses such as ``RSWASpec`` or ``SinkFullAttentionSpec`` have managers of their own)."""
    name = type(spec).__name__
    if name in ("FullAttentionSpec", "MLAAttentionSpec"):
        return "full_attention"
    if name in ("SlidingWindowSpec", "SlidingWindowMLASpec"):
        return "sliding_window"
    return name


def layer_group_index(groups: Sequence[Any]) -> dict[str, tuple[int, Any]]:
    """layer name -> (group index, spec)."""
    out: dict[str, tuple[int, Any]] = {}
    for gi, g in enumerate(groups):
        for name in g.layer_names:
            out[name] = (gi, g.kv_cache_spec)
    return out
