"""The engine-neutral connector API: what every backend implements and every adapter calls.

A connector has two halves that live in different places:

* the **scheduler half** (:class:`SchedulerConnector`) runs inside the engine's scheduling loop,
  once per engine, on the engine's scheduler thread. Every call is on the hot path of every step:
  O(1) work per request, no I/O, no blocking, no large allocations.
* the **worker half** (:class:`WorkerConnector`) runs in each model worker (one per TP rank), next
  to the KV cache tensors, on the thread that runs the forward pass. It moves bytes; it must never
  stall the forward pass beyond the waits its methods allow.

The engine calls each half from one thread, never two of its methods at once; a backend's own
threads (a progress loop, copy threads) are its business. The halves talk only through the
per-step metadata that the scheduler builds (:meth:`SchedulerConnector.build_step_metadata`) and
the worker binds (:meth:`WorkerConnector.bind_step_metadata`), and through
:class:`TransferResults` flowing back.

Engine objects never appear here. An adapter (``kvconnect.adapters``) turns the engine's request
into a :class:`RequestView`, its block tables into :data:`BlockIds` and its KV tensors into
:class:`kvconnect.layout.KVLayout` descriptions.

Call order (each method's docstring holds its contract)
-------------------------------------------------------
Scheduler half, for one request: :meth:`~SchedulerConnector.get_num_new_matched_tokens` (maybe
several times) → :meth:`~SchedulerConnector.update_state_after_alloc` →
:meth:`~SchedulerConnector.hit_source_of` → once per step
:meth:`~SchedulerConnector.build_step_metadata` … → :meth:`~SchedulerConnector.request_finished`;
every step :meth:`~SchedulerConnector.update_worker_output`, then
:meth:`~SchedulerConnector.take_events` and :meth:`~SchedulerConnector.get_gauges`.

Worker half: :meth:`~WorkerConnector.register_kv_caches` once at start, then per step
:meth:`~WorkerConnector.bind_step_metadata` → :meth:`~WorkerConnector.start_load_kv` → (forward
pass: :meth:`~WorkerConnector.wait_for_layer_load` before a layer's attention,
:meth:`~WorkerConnector.save_kv_layer` after it) → :meth:`~WorkerConnector.wait_for_save` →
:meth:`~WorkerConnector.get_transfer_results` → :meth:`~WorkerConnector.clear_step_metadata`.

Both halves: bad input from outside (a malformed transfer param, garbage from a peer) fails that
request's load through the engine's load-failure path, never the engine; errors that stop a start
are :class:`~kvconnect.errors.KVConnectError` subclasses naming what was wrong.
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
    """Scheduler half: runs in the engine's scheduling loop, on its hot path (module docstring:
    the call order; each method: its contract)."""

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
        """The tier supplying ``request_id``'s external tokens (``host``, ``p2p``, ...), so the
        engine can count hits per tier. Asked right after :meth:`update_state_after_alloc`
        accepted some; hot path: a lookup, nothing more."""
        return self.hit_source

    @abc.abstractmethod
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """How many tokens beyond ``num_computed_tokens`` this connector can supply from outside
        (a remote prefill, a storage tier), and whether that load is asynchronous.

        Returns ``(n, is_async)``; ``n is None`` means "not known yet, ask again next step" (an
        answer still being looked up off the engine thread). Called on the scheduler thread
        when the engine considers scheduling ``request``; it may call again for the same request
        before allocating (it retries when it cannot allocate), so repeated calls must give
        the same answer and leave nothing behind that :meth:`update_state_after_alloc` with
        ``num_external_tokens == 0`` does not release. Hot path: no I/O, no blocking, no
        allocation beyond a small per-request record. Must not raise for anything the request
        carries (the worker refuses a malformed transfer param when it loads).
        """

    @abc.abstractmethod
    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        """The engine allocated ``block_ids`` for ``request`` (every group, from token 0).

        ``num_external_tokens`` is how many tokens it accepted from this connector's last
        :meth:`get_num_new_matched_tokens` answer: zero when it took none (or another connector
        owns the load), in which case anything the lookup pinned must be released. Record what
        the worker must load or save for the next :meth:`build_step_metadata`. Called on the
        scheduler thread, once per allocation; hot path: no I/O, no blocking.
        """

    @abc.abstractmethod
    def build_step_metadata(self, step: StepView) -> Any:
        """Everything the workers need for this step: what was recorded since the last call
        (loads, stores, finished requests), which is then forgotten.

        Called on the scheduler thread once per engine step, after scheduling. The result is
        handed to every worker's :meth:`WorkerConnector.bind_step_metadata` and may cross a
        process boundary: a msgspec Struct (or None). Hot path: work in proportion to what
        happened this step; when :attr:`reads_step` is False, ``step`` may be empty.
        """

    def request_finished(
        self, request: RequestView, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        """``request`` finished or was aborted (``request.finish_reason`` says which).

        Returns ``(delay_free, transfer_params)``. ``delay_free=True`` keeps the blocks allocated
        until a worker reports the request in ``finished_sending`` — which it then must do, on
        success, failure or expiry alike, or the blocks leak. ``transfer_params`` go back to the
        client or router (P/D: what the decode instance needs to pull). Called on the scheduler
        thread, once per request; no I/O, no blocking.
        """
        return False, None

    def update_worker_output(self, results: TransferResults) -> None:
        """One step's :class:`TransferResults`, aggregated over every worker (a request appears
        once every worker has reported it). Called on the scheduler thread once per step, after
        the forward pass. ``results`` is read-only: it may hold the engine's own sets."""
        return None

    def has_pending_work(self) -> bool:
        """True while work the engine must keep stepping for is in flight (e.g. stores or pushes
        of finished requests), so an idle engine does not stall it. Asked on the scheduler
        thread when the engine has nothing else to run; cheap."""
        return False

    def set_handshake_metadata(self, metadata: Mapping[int, Any]) -> None:
        """Every worker's :meth:`WorkerConnector.get_handshake_metadata`, keyed by TP rank, when
        the engine forwards it: once at start, before the first step, on the scheduler thread."""
        return None

    def get_stats(self) -> dict[str, Any]:
        """A snapshot of this half's own counters, for diagnostics and benchmarks (metrics come
        from the workers' :attr:`TransferResults.stats`). Scheduler thread; cheap; no side effect."""
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
        """Stop whatever the half started (threads, sockets) and give back what it holds.
        Called once, when the engine shuts down; every wait in it has a deadline."""
        return None


class WorkerConnector(abc.ABC):
    """Worker half: one per TP rank, next to the KV cache, on the forward pass's thread (module
    docstring: the call order; each method: its contract)."""

    supports_hybrid: bool = False

    @abc.abstractmethod
    def register_kv_caches(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> None:
        """The engine's KV cache: ``caches`` maps layer name to its tensor and layout, in model
        layer order. Called once on the worker thread, before any step. The one call that may
        take its time: allocate pools, register memory with a transport, open listeners (every
        wait bounded). Raises :class:`~kvconnect.errors.LayoutError` (or another
        :class:`~kvconnect.errors.KVConnectError`) naming the layer when it cannot serve a
        layout: the engine's start then fails."""

    @abc.abstractmethod
    def bind_step_metadata(self, metadata: Any) -> None:
        """This step's metadata from :meth:`SchedulerConnector.build_step_metadata` (possibly
        decoded in another process). Called on the worker thread once per step, before
        :meth:`start_load_kv`; no blocking."""

    def clear_step_metadata(self) -> None:
        """The step is over (after :meth:`get_transfer_results`): drop the bound metadata."""
        return None

    def start_load_kv(self) -> None:
        """Start this step's loads, before the forward pass. Asynchronous loads run in the
        background and end in :meth:`get_transfer_results`; must not wait for a transfer."""
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before ``layer_name``'s attention: return once this step's synchronous loads into
        that layer have landed, or have failed or run past their deadline (then reported as
        failed loads). Never waits for asynchronous loads."""
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        """After ``layer_name``'s attention in the forward pass: the layer's KV of this step is
        written. May start a copy of it; must not block the forward pass."""
        return None

    def wait_for_save(self) -> None:
        """After the forward pass: start (or finish) this step's stores. Once it returns the engine
        may free and reuse the blocks of finished requests, except those whose freeing the
        scheduler half deferred (``delay_free``): a store still running after it returns may
        read only blocks the engine keeps."""
        return None

    @abc.abstractmethod
    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults:
        """What ended since the last call: sends, stores and loads, each request once. Called on
        the worker thread once per step, after the forward pass; ``finished_request_ids`` are the
        requests the engine finished since the last call. A poll: it never waits for a transfer.

        A request is reported finished only when every status of its transfer succeeded; a failed
        or timed-out load is reported received *and* failed, with the engine block ids it covered
        in ``invalid_block_ids``, so the engine's load-failure policy (recompute or fail) applies.
        """

    def get_handshake_metadata(self) -> Any | None:
        """What this worker publishes for the scheduler half (e.g. its side-channel address):
        asked once after :meth:`register_kv_caches`, forwarded to
        :meth:`SchedulerConnector.set_handshake_metadata`. None when there is nothing."""
        return None

    def shutdown(self) -> None:
        """Stop the half's threads and listeners, give back every lent block and registered
        region. Called once, when the engine shuts down; every wait in it has a deadline."""
        return None
