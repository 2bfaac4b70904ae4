"""The scheduler half of P/D transfer, shared by every transport. It speaks vLLM's
``kv_transfer_params`` protocol, so routers that drive vLLM's NixlConnector drive it unchanged.

Producer (prefill instance): a request arrives with ``{"do_remote_decode": true}``. When it
finishes normally (``length`` -- the router's ``max_tokens=1`` -- or ``stop``) its blocks are kept
(``delay_free``) under a lease and the returned params tell the consumer where they are. An
aborted or failed request frees its blocks at once and returns nothing.

Consumer (decode instance): a request arrives with the producer's params
(``do_remote_prefill: true`` ...). Every prompt token not computed locally is offered as an
asynchronous external load; once the engine allocated blocks, the load is handed to the workers
with the router's params as they came. The workers check them (:mod:`kvconnect.pd.params`):
malformed params fail the load with an error naming the field, through the engine's load-failure
path (vLLM's ``kv_load_failure_policy``), and the request is never served from them.
A consumer request that never loads (aborted early, or fully cached here) still tells the
producer to free its blocks. A consumer request aborted while its load is in flight keeps its
blocks (``delay_free``) until every worker reports the transfer ended (in ``finished_sending``):
a READ still in flight must never write into blocks the engine gave to another request.

Every call is O(1) per request and reads only the fields it decides on; block-id lists and router
params are never copied: vLLM builds the lists it passes for each call, and the params are only read.
"""

from __future__ import annotations

import logging
from typing import Any

from kvconnect.api import (
    BlockIds,
    EngineInfo,
    RequestView,
    SchedulerConnector,
    StepView,
    TransferResults,
)
from kvconnect.config import PDConfig
from kvconnect.pd import wire as W

logger = logging.getLogger(__name__)

#: Finish reasons after which a producer keeps the blocks for its consumer (vLLM keeps them for
#: length-capped and stopped requests alike).
KEEP_FOR = frozenset({"length", "stop"})


def advertised_host(cfg: PDConfig) -> str:
    if cfg.advertise_host:
        return cfg.advertise_host
    if cfg.side_channel_host in ("*", "0.0.0.0", "::"):
        logger.warning("side_channel_host %r binds every address; set advertise_host so peers "
                       "can reach this instance (using 127.0.0.1)", cfg.side_channel_host)
        return "127.0.0.1"
    return cfg.side_channel_host


def base_port(cfg: PDConfig, engine: EngineInfo) -> int:
    """Side-channel port of TP rank 0 of this engine (data-parallel ranks get their own range)."""
    return cfg.side_channel_port + engine.dp_rank * engine.tp_size


_EMPTY = W.PDStepMetadata()


class PDScheduler(SchedulerConnector):
    supports_hybrid = True
    loads_only_when = "do_remote_prefill"
    hit_source = "p2p"
    reads_step = False
    empty_step_metadata = _EMPTY

    def __init__(self, config: PDConfig, engine: EngineInfo) -> None:
        self._mode = "pull" if config.pull else "push"
        self._host = advertised_host(config)
        self._port = base_port(config, engine)
        #: what a producer's reply says of this instance, the same for every request
        self._reply: dict[str, Any] = {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": engine.engine_id,
            "remote_block_ids": None, "remote_host": self._host, "remote_port": self._port,
            "remote_request_id": None, "tp_size": engine.tp_size, "remote_block_size": engine.block_sizes[0],
            "kvconnect_mode": self._mode,
        }
        #: consumer requests looked up and not yet allocated: tokens computed here (the load's start)
        self._starts: dict[str, int] = {}
        #: consumer requests whose load (or release) was handed to the workers, until finished:
        #: one transfer per request, however often the engine asks again
        self._handed: set[str] = set()
        self._loads: list[W.LoadRequest] = []
        self._leases: list[W.LeaseSpec] = []
        self._releases: list[W.ReleaseRequest] = []
        self._aborts: list[str] = []
        self._leased: set[str] = set()
        self._loading: set[str] = set()
        #: consumer requests finished while loading: blocks held until the workers say so
        self._aborted: set[str] = set()

    # -- consumer ---------------------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: RequestView, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = request.transfer_params
        if not params or not params.get("do_remote_prefill"):
            return 0, False
        rid = request.request_id
        if rid in self._handed:
            return 0, False
        self._starts[rid] = num_computed_tokens
        # Every prompt token not computed here comes from the producer; the engine itself
        # recomputes the last one when it needs its logits (vLLM does).
        count = request.num_prompt_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(
        self, request: RequestView, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        params = request.transfer_params
        if not params or not params.get("do_remote_prefill"):
            return
        rid = request.request_id
        start = self._starts.pop(rid, 0)
        if rid in self._handed:
            return
        self._handed.add(rid)
        if num_external_tokens <= 0:  # all computed here: the producer may free its blocks
            self._releases.append(W.ReleaseRequest(request_id=rid, params=params))
            return
        self._loads.append(
            W.LoadRequest(
                request_id=rid, params=params,
                local_block_ids=tuple(block_ids),  # the engine's lists are fresh per call: no copy
                token_start=start, token_end=start + num_external_tokens,
            )
        )
        self._loading.add(rid)

    # -- both ------------------------------------------------------------------------------------
    def build_step_metadata(self, step: StepView) -> W.PDStepMetadata:
        loads, leases, releases, aborts = self._loads, self._leases, self._releases, self._aborts
        if not (loads or leases or releases or aborts):
            return _EMPTY
        # Most steps carry one kind (a producer's leases, a consumer's loads): the others stay
        # the shared empty tuple, and only what was sent is emptied.
        return W.PDStepMetadata(loads=_take(loads), leases=_take(leases), releases=_take(releases),
                                aborts=_take(aborts))

    def request_finished(
        self, request: RequestView, block_ids: BlockIds
    ) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        params = request.transfer_params
        if not params:
            return False, None
        if params.get("do_remote_prefill"):
            self._starts.pop(rid, None)
            if rid not in self._handed:
                # Never allocated (aborted while waiting): the producer must still free.
                self._releases.append(W.ReleaseRequest(request_id=rid, params=params))
                return False, None
            self._handed.discard(rid)
            if rid in self._loading:
                return self._abort_load(rid), None
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if request.finish_reason not in KEEP_FOR or not any(block_ids):  # any(): some group has blocks
            return False, None
        groups = tuple(block_ids)  # the engine's lists are built for this call: kept, not copied
        self._leases.append(W.LeaseSpec(request_id=rid, block_ids=groups))
        self._leased.add(rid)
        reply = self._reply.copy()  # a copy of a dict of constants: cheaper than building one
        reply["remote_block_ids"] = groups[0] if len(groups) == 1 else list(groups)
        reply["remote_request_id"] = rid
        return True, reply

    def _abort_load(self, rid: str) -> bool:
        """The engine finished a consumer request whose load was handed off: hold its blocks
        until the workers report the load ended, unless the load never left this scheduler."""
        for i, spec in enumerate(self._loads):
            if spec.request_id == rid:  # not yet sent to the workers: nothing is in flight
                del self._loads[i]
                self._loading.discard(rid)
                self._releases.append(W.ReleaseRequest(request_id=rid, params=spec.params))
                return False
        self._aborted.add(rid)
        self._aborts.append(rid)
        return True

    def update_worker_output(self, results: TransferResults) -> None:
        if results.finished_sending:
            self._leased -= results.finished_sending
            if self._aborted:
                ended = self._aborted & results.finished_sending
                self._aborted -= ended
                self._loading -= ended
        recving, failed = results.finished_recving, results.failed_recving
        if recving or failed:
            self._loading -= recving
            if failed:  # a subset of finished_recving from kvconnect's workers; not assumed
                self._loading -= failed
            gone = self._aborted and self._aborted & (recving | failed)
            if gone:
                # The engine finished the request (e.g. policy `fail` on this very failure) in the
                # same update that reports its receive: it frees the blocks through that receive,
                # so the abort must not reach the workers (a later finished_sending would name a
                # request the engine has already deleted).
                self._aborted -= gone
                self._aborts = [rid for rid in self._aborts if rid not in gone]

    def has_pending_work(self) -> bool:
        return bool(self._leased or self._loading or self._loads or self._leases or self._releases
                    or self._aborts)

    def get_stats(self) -> dict[str, Any]:
        return {"leased": len(self._leased), "loading": len(self._loading)}


def _take(pending: list) -> tuple:
    if not pending:
        return ()
    out = tuple(pending)
    pending.clear()
    return out

