"""The router's ``kv_transfer_params``, checked where they are used: on the consumer worker's
progress thread, not on the engine's scheduler thread (see :mod:`kvconnect.pd.wire`).

A :class:`~kvconnect.pd.wire.LoadRequest` or :class:`~kvconnect.pd.wire.ReleaseRequest` becomes a
:class:`~kvconnect.pd.wire.LoadSpec` / :class:`~kvconnect.pd.wire.ReleaseSpec`, or a
:class:`~kvconnect.errors.WireError` naming the field that was wrong. The block ids' values are
checked later still, where they become transfer descriptors (:func:`kvconnect.pd.plan`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvconnect.errors import WireError
from kvconnect.metadata import KVTransferParams, block_groups, parse_transfer_params
from kvconnect.pd import wire as W

MODES = (None, "pull", "push", "read", "write")


def _consumer_params(params: Any) -> KVTransferParams:
    p = parse_transfer_params(params)
    if p is None or not p.do_remote_prefill:
        raise WireError("kv_transfer_params: a load needs do_remote_prefill")
    if not p.remote_request_id:
        raise WireError("kv_transfer_params: do_remote_prefill needs remote_request_id")
    if p.tp_size is not None and p.tp_size <= 0:
        raise WireError(f"kv_transfer_params: tp_size {p.tp_size} must be positive")
    return p


def _remote(p: KVTransferParams) -> W.Remote:
    return W.Remote(engine_id=p.remote_engine_id or "", host=p.remote_host or "", port=p.remote_port or 0,
                    tp_size=p.tp_size or 1)


def resolve_load(req: W.LoadRequest, block_sizes: Sequence[int], default_mode: str) -> W.LoadSpec:
    """Check a load's router params against this model (``block_sizes``: one per KV-cache group)."""
    p = _consumer_params(req.params)
    if p.kvconnect_mode not in MODES:
        raise WireError(f"kv_transfer_params: kvconnect_mode {p.kvconnect_mode!r} is not pull or push")
    groups = block_groups(p.remote_block_ids)
    if len(groups) != len(block_sizes):
        raise WireError(f"kv_transfer_params: remote_block_ids has {len(groups)} KV-cache group(s), "
                        f"this model has {len(block_sizes)}")
    bs = p.remote_block_size if p.remote_block_size is not None else block_sizes[0]
    if bs <= 0:
        raise WireError(f"kv_transfer_params: remote_block_size {bs} must be positive")
    if len(groups[0]) * bs < req.token_end:
        raise WireError(f"kv_transfer_params: remote_block_ids cover {len(groups[0])} blocks of {bs} tokens, "
                        f"the load needs tokens up to {req.token_end}")
    mode = p.kvconnect_mode or default_mode
    return W.LoadSpec(
        request_id=req.request_id, remote_request_id=p.remote_request_id,  # type: ignore[arg-type]
        remote=_remote(p), local_block_ids=req.local_block_ids, remote_block_ids=groups,  # type: ignore[arg-type]
        token_start=req.token_start, token_end=req.token_end,
        mode="pull" if mode in ("pull", "read") else "push",
    )


def resolve_release(req: W.ReleaseRequest) -> W.ReleaseSpec:
    p = _consumer_params(req.params)
    return W.ReleaseSpec(request_id=req.request_id, remote_request_id=p.remote_request_id,  # type: ignore[arg-type]
                         remote=_remote(p))
