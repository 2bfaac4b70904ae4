"""The engine-neutral connector API: what every backend implements and every adapter calls.

A connector has two halves that live in different places:

* the **scheduler half** (:class:`SchedulerConnector`) runs inside the engine's scheduling loop,
  once per engine. Every call here is on the hot path of every step: O(1) work per request, no
  I/O, no blocking, no large allocations.
* the **worker half** (:class:`WorkerConnector`) runs in each model worker (one per TP rank), next
  to the KV cache tensors. It moves bytes.

The halves talk only through the per-step metadata that the scheduler builds
(:meth:`SchedulerConnector.build_step_metadata`) and the worker binds
(:meth:`WorkerConnector.bind_step_metadata`), and through :class:`TransferResults` flowing back.

Engine objects never appear here. An adapter (``kvconnect.adapters``) turns the engine's request
into a :class:`RequestView`, its block tables into :data:`BlockIds` and its KV tensors into
:class:`kvconnect.layout.KVLayout` descriptions.

Scheduler half, in the order an engine calls it for one request
----------------------------------------------------------------
``get_num_new_matched_tokens(request, num_computed_tokens)``
    How many tokens beyond ``num_computed_tokens`` can this connector supply from outside (a remote
    prefill, the CPU tier)? Returns ``(n, is_async)``; ``n is None`` means "not known yet, ask again
    next step". May be called several times for the same request before allocation (the engine
    retries when it cannot allocate), so it must be free of side effects that matter.
``update_state_after_alloc(request, block_ids, num_external_tokens)``
    The engine allocated ``block_ids`` for the request; ``num_external_tokens`` is what it accepted
    from this connector (zero when another connector owns the load). Record what the worker must
    load or save.
``build_step_metadata(step)``
    Called once per engine step after scheduling: hand the workers everything recorded since the
    last call, then forget it. Returns a msgspec Struct (it may cross a process boundary).
``request_finished(request, block_ids)``
    The request finished (or was aborted). Returns ``(delay_free, transfer_params)``:
    ``delay_free=True`` keeps the blocks allocated until a worker reports the request in
    ``finished_sending``; ``transfer_params`` go back to the client/router (P/D).
``update_worker_output(results)``
    The aggregated :class:`TransferResults` of all workers for one step.
``take_events()``, ``get_gauges()``
    Once per step, after the worker output: KV cache events of a storage tier
    (:mod:`kvconnect.events`), and levels such as the blocks and bytes a tier holds.
``hit_source_of(request_id)``
    Right after an allocation notice with external tokens: the tier they come from (``host``,
    ``p2p``, ...), so the engine can count hits per tier.

Worker half, in the order an engine calls it for one step
---------------------------------------------------------
``register_kv_caches(caches)`` once at start; then per step: ``bind_step_metadata(meta)`` →
``start_load_kv()`` → (forward pass: ``wait_for_layer_load(layer)`` before a layer's attention,
``save_kv_layer(layer, tensor)`` after it) → ``wait_for_save()`` →
``get_transfer_results(finished_request_ids)`` → ``clear_step_metadata()``.

``get_transfer_results`` reports requests whose sends or receives completed since the last call.
A failed or timed-out load is reported as received *and* failed, with the engine block ids it
covered in ``invalid_block_ids``, so the engine's load-failure policy (recompute or fail) applies.
A worker never reports a request finished before every status of its transfer succeeded.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvconnect.layout import KVLayout

#: Engine block ids of one request, one list per KV-cache group (a plain model has one group;
#: hybrid models have one per attention type). Block ids are unique across groups.
BlockIds = Sequence[Sequence[int]]

ROLE_PRODUCER = "kv_producer"
ROLE_CONSUMER = "kv_consumer"
ROLE_BOTH = "kv_both"
ROLES = (ROLE_PRODUCER, ROLE_CONSUMER, ROLE_BOTH)


@dataclass(slots=True)
class RequestView:
    """What a connector may know about an engine request. Built by the adapter, cheap to build."""

    request_id: str
    #: The prompt token ids.
    prompt_token_ids: Sequence[int]
    #: Prompt plus output tokens so far (for stores of generated blocks).
    all_token_ids: Sequence[int] | None = None
    #: The engine's chained hashes of the request's full blocks, if it computes them (vLLM does).
    block_hashes: Sequence[bytes] | None = None
    #: Transfer params sent by the client or router (vLLM's ``kv_transfer_params``).
    transfer_params: Mapping[str, Any] | None = None
    #: Isolates caches across tenants / LoRA adapters: folded into every prefix hash.
    cache_salt: str | None = None
    #: Set when the request finished: ``length`` (hit max tokens), ``stop``, ``abort`` or ``error``.
    finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class ScheduledRequest:
    """One request scheduled in this step."""

    request_id: str
    #: Blocks newly allocated to the request in this step (per group); empty lists when none.
    new_block_ids: BlockIds
    #: Tokens already computed before this step.
    num_computed_tokens: int
    #: Tokens computed in this step.
    num_scheduled_tokens: int
    #: True when the request (re)starts: its block list is given whole in ``new_block_ids``.
    is_new: bool = False


@dataclass(slots=True)
class StepView:
    """The part of one engine step that connectors need."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    #: Requests that finished or were aborted since the previous step.
    finished_request_ids: set[str] = field(default_factory=set)
    #: Requests preempted in this step: their blocks are gone.
    preempted_request_ids: set[str] = field(default_factory=set)


@dataclass(slots=True)
class TransferResults:
    """What workers report back each step. Every field may be empty. Read-only for the scheduler
    half that receives it: an engine adapter may hand over the engine's own sets."""

    #: Requests whose blocks this worker no longer needs (producer side done, or store done).
    finished_sending: set[str] = field(default_factory=set)
    #: Requests whose asynchronous load ended, successfully or not.
    finished_recving: set[str] = field(default_factory=set)
    #: Subset of ``finished_recving`` whose load failed (their KV must not be used).
    failed_recving: set[str] = field(default_factory=set)
    #: Engine block ids whose content could not be loaded.
    invalid_block_ids: set[int] = field(default_factory=set)
    #: Backend statistics (plain dict of numbers); None when there is nothing new.
    stats: dict[str, Any] | None = None
    #: Subset of ``finished_sending`` whose send/store failed (e.g. a CPU-offload store that could
    #: not be completed: the blocks may be freed, but the stored copy must not be used).
    failed_sending: set[str] = field(default_factory=set)
    #: Why a request failed, by request id: a load in ``failed_recving``, or a P/D send in
    #: ``finished_sending`` that did not deliver (write failed, lease expired). Informative only:
    #: an engine that can show a reason (SGLang's ``failure_exception``) reads it.
    failure_reasons: dict[str, str] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (
            self.finished_sending
            or self.finished_recving
            or self.failed_recving
            or self.invalid_block_ids
            or self.stats
            or self.failed_sending
            or self.failure_reasons
        )


@dataclass(slots=True)
class EngineInfo:
    """Static facts about the engine instance a connector half runs in."""

    #: Unique id of this engine instance (vLLM's ``engine_id``).
    engine_id: str
    #: ``kv_producer``, ``kv_consumer`` or ``kv_both``.
    role: str = ROLE_BOTH
    tp_size: int = 1
    tp_rank: int = 0
    #: Tokens per engine block, per KV-cache group.
    block_sizes: tuple[int, ...] = (16,)
    #: Model identity for the compatibility hash (architecture, layers, heads, head size, dtype).
    model_signature: Mapping[str, Any] = field(default_factory=dict)
    #: Data-parallel rank, when the engine runs several.
    dp_rank: int = 0
    #: KV bytes one engine block takes on this rank, summed over every layer of every group
    #: (what one CPU-offload slot must hold). 0 when the engine cannot tell before registration.
    kv_bytes_per_block: int = 0
    #: Total KV heads of the model (before the TP split); 1 for MLA.
    num_kv_heads: int = 0
    #: Layer names of each KV-cache group, in group order.
    layer_groups: tuple[tuple[str, ...], ...] = ()
    #: Attention of each KV-cache group, in group order: ``full_attention``, ``sliding_window``
    #: or the engine's name for another kind. Empty when the engine does not say.
    group_kinds: tuple[str, ...] = ()
    #: Window in tokens of each KV-cache group (0 where the group is not sliding-window).
    sliding_windows: tuple[int, ...] = ()
    #: The block id the engine hands for a block it does not keep (vLLM's null block: positions
    #: outside a sliding window), if it has one. Never stored to or loaded into.
    null_block_id: int | None = None
    #: The model the engine serves (vLLM: its path or hub name). A shared tier keys objects by it;
    #: kept out of ``model_signature`` so P/D peers serving one model from different paths agree.
    model_name: str = ""
    #: The engine publishes KV cache events: storage tiers report what they hold
    #: (:meth:`SchedulerConnector.take_events`).
    kv_events: bool = False

    @property
    def block_size(self) -> int:
        return self.block_sizes[0]


class SchedulerConnector(abc.ABC):
    """Scheduler half. See the module docstring for the call order and the rules."""

    #: A composition supports hybrid (multi-group) models only when every part does.
    supports_hybrid: bool = False
    #: The transfer-params key a request must set for this backend to load anything for it
    #: (P/D: ``do_remote_prefill``); None when any request may load (CPU offload). An engine
    #: adapter may then skip ``get_num_new_matched_tokens`` (answering ``(0, False)``) and
    #: ``update_state_after_alloc`` for every other request: both are on the engine's hot path.
    loads_only_when: str | None = None
    #: False when ``build_step_metadata`` never reads its :class:`StepView` (P/D): an engine
    #: adapter may then pass an empty one instead of translating the engine's step, every step.
    reads_step: bool = True
    #: The one object ``build_step_metadata`` returns for every step with nothing to send, if it
    #: has one (P/D): an engine adapter may wrap it once instead of every step.
    empty_step_metadata: Any = None
    #: The cache tier this backend's loads come from, in vLLM's cache-hit-source words (``host``,
    #: ``p2p``, ``disk``); None: unspecified.
    hit_source: str | None = None

    def hit_source_of(self, request_id: str) -> str | None:
        """The tier supplying ``request_id``'s external tokens (asked right after
        ``update_state_after_alloc`` accepted some)."""
        return self.hit_source

    @abc.abstractmethod
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> tuple[int | None, bool]: ...

    @abc.abstractmethod
    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None: ...

    @abc.abstractmethod
    def build_step_metadata(self, step: StepView) -> Any: ...

    def request_finished(
        self, request: RequestView, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, None

    def update_worker_output(self, results: TransferResults) -> None:
        return None

    def has_pending_work(self) -> bool:
        """True while work the engine must keep stepping for is in flight (e.g. stores or pushes
        of finished requests), so an idle engine does not stall it."""
        return False

    def set_handshake_metadata(self, metadata: Mapping[int, Any]) -> None:
        """Worker handshake metadata, keyed by TP rank, when the engine forwards it."""
        return None

    def get_stats(self) -> dict[str, Any]:
        return {}

    def take_events(self) -> list[Any]:
        """KV cache events (:mod:`kvconnect.events`) recorded since the last call: blocks that
        landed in or left a storage tier. Called once per engine step; empty when the engine
        publishes no events (``EngineInfo.kv_events``) or the backend stores nothing."""
        return []

    def get_gauges(self) -> dict[str, Any]:
        """Current levels (e.g. ``held_blocks``, ``held_bytes`` of a storage tier; a composition
        keys them by child name); cheap, called once per engine step."""
        return {}

    def shutdown(self) -> None:
        return None


class WorkerConnector(abc.ABC):
    """Worker half. See the module docstring for the call order and the rules."""

    supports_hybrid: bool = False

    @abc.abstractmethod
    def register_kv_caches(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> None:
        """``caches`` maps layer name to its tensor and layout, in model layer order."""

    @abc.abstractmethod
    def bind_step_metadata(self, metadata: Any) -> None: ...

    def clear_step_metadata(self) -> None:
        return None

    def start_load_kv(self) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    @abc.abstractmethod
    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults: ...

    def get_handshake_metadata(self) -> Any | None:
        """Metadata the engine may forward to the scheduler half (e.g. side-channel address)."""
        return None

    def shutdown(self) -> None:
        return None
