"""One SGLang rank's data plane on kvconnect's P/D core (:mod:`kvconnect.pd`). No SGLang import.

A rank is a :class:`~kvconnect.pd.worker.PDWorker` of its own (TP 1 as the core sees it: SGLang's
Common classes already decide which prefill rank serves which decode rank), over the transport
the config names (``nixl`` or ``mori``). Everything the core does holds here too: one progress
thread owns the transport, handshakes are checked (compatibility hash, transport name), a
prefill rank *leases* a request's pages until the decode rank's write ended or
``lease_timeout_s`` passed, a decode rank's load fails at ``handshake_timeout_s +
transfer_timeout_s``, and ``verify_checksums`` checks every page before the decode sees it.

SGLang's KV pool is a list of buffers (one per layer and K/V plane, or per layer for MLA), each an
array of pages of ``item_len`` bytes. Each buffer is described to the core as a headless layer of
``[pages, 1, item_len]`` bytes: a page is one "token" of one block, so two ranks are compatible
exactly when their buffers have the same page bytes (page size, heads, head size and dtype all
show there), and a checksum mismatch names the page.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kvconnect.adapters.sglang import wire as W
from kvconnect.api import EngineInfo, TransferResults
from kvconnect.config import PD_BACKENDS, PDConfig, parse_config
from kvconnect.errors import ConfigError, WireError
from kvconnect.layout import MLA_DIMS, KVLayout
from kvconnect.pd import wire as PW
from kvconnect.pd.worker import PDWorker

#: Environment variable holding kvconnect's JSON config for the SGLang transfer backend.
CONFIG_ENV = "KVCONNECT_SGLANG_CONFIG"

WorkerFactory = Callable[[PDConfig, EngineInfo], PDWorker]


def load_config(raw: str | None = None) -> PDConfig:
    """The P/D backend options from ``KVCONNECT_SGLANG_CONFIG`` (``nixl`` with defaults when unset).

    Every key means what it means under vLLM. ``mode`` is the one key SGLang fixes: its protocol
    pushes (the decode rank allocates, the prefill rank writes), so ``pull`` / ``read`` are refused.
    ``side_channel_port`` unset (or 0) takes a free port per rank: SGLang's messages carry it."""
    raw = os.environ.get(CONFIG_ENV) if raw is None else raw
    try:
        data = json.loads(raw) if raw else {"backend": "nixl"}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{CONFIG_ENV} is not valid JSON: {e}") from e
    one = data.get("backends") if isinstance(data, dict) else None
    if isinstance(one, list) and len(one) == 1 and isinstance(one[0], dict):  # read like one backend
        data = {**{k: v for k, v in data.items() if k != "backends"}, **one[0]}
    if isinstance(data, dict) and "backend" not in data and "backends" not in data:
        data = {"backend": "nixl", **data}
    composition = sorted({"load_rule", "unsupported_model"} & set(data if isinstance(data, dict) else ()))
    if composition:
        raise ConfigError(
            f"{CONFIG_ENV}: {composition} configure a composition of backends; the SGLang transfer "
            "backend runs one P/D backend, so they have no meaning here: leave them out"
        )
    if isinstance(data, dict) and data.get("backend") in PD_BACKENDS:
        if data.get("mode", "push") not in ("push", "write"):
            raise ConfigError(
                f"{CONFIG_ENV}: mode {data['mode']!r} has no meaning under SGLang: its P/D protocol "
                "pushes (the prefill rank writes into pages the decode rank allocated); leave 'mode' "
                "out or set it to 'push'"
            )
        data = {"mode": "push", "side_channel_port": 0, **data}
    cfg = parse_config(data)
    if len(cfg.backends) != 1 or not isinstance(cfg.backends[0], PDConfig):
        raise ConfigError(
            f"{CONFIG_ENV}: the SGLang transfer backend takes one P/D backend ('nixl' or 'mori'), "
            f"got {cfg.names}; SGLang's host tier is configured through --hicache-storage-backend instead"
        )
    return cfg.backends[0]


def pool_layers(ptrs: Sequence[int], lens: Sequence[int], item_lens: Sequence[int], device: str) -> dict:
    """``{name: (tensor, layout)}`` of a rank's KV buffers as the P/D core registers them: byte
    tensors ``[pages, 1, item_len]`` over SGLang's own memory (no copy)."""
    out = {}
    for i, (ptr, nbytes, item) in enumerate(zip(ptrs, lens, item_lens)):
        pages = int(nbytes) // int(item)
        t = _bytes_at(int(ptr), pages * int(item), device).view(pages, 1, int(item))
        out[f"buf{i}"] = (t, KVLayout.of_tensor(t, MLA_DIMS))
    if not out:
        raise ConfigError("SGLang gave kvconnect no KV buffers to register")
    return out


def _bytes_at(ptr: int, nbytes: int, device: str):
    """A uint8 torch tensor over ``nbytes`` of existing memory at ``ptr`` (host or CUDA)."""
    import numpy as np
    import torch

    if device == "cpu":
        arr = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(ptr))
        return torch.from_numpy(arr)

    class _Cuda:  # the CUDA array interface lets torch wrap device memory it did not allocate
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}

    return torch.as_tensor(_Cuda(), device=device)


def read_rows(ptrs: Sequence[int], item_lens: Sequence[int], slot: int) -> tuple[bytes, ...]:
    """Prefill: a request's metadata rows (first output token, logprobs, ...), one per buffer."""
    return tuple(ctypes.string_at(int(p) + int(slot) * int(n), int(n)) for p, n in zip(ptrs, item_lens))


def write_rows(ptrs, data_lens, item_lens, slot: int, rows: Sequence[bytes]) -> None:
    """Decode: put the rows :func:`read_rows` gave into ``slot``; WireError (nothing written) when
    they do not fit this rank's buffers."""
    if len(rows) > len(item_lens):
        raise WireError(f"{len(rows)} metadata rows for {len(item_lens)} buffers")
    for dlen, ilen, row in zip(data_lens, item_lens, rows):
        if len(row) != ilen or not (0 <= slot and (slot + 1) * ilen <= dlen):
            raise WireError(f"metadata row of {len(row)} bytes at slot {slot} does not fit")
    for ptr, ilen, row in zip(ptrs, item_lens, rows):
        ctypes.memmove(int(ptr) + slot * int(ilen), row, len(row))


class RankLink:
    """A rank's P/D worker, spoken to in SGLang's terms: pages, rooms, leases and loads."""

    def __init__(
        self,
        cfg: PDConfig,
        engine_id: str,
        rank: int,
        buffers: dict,
        signature: dict[str, Any],
        worker_factory: WorkerFactory | None = None,
    ) -> None:
        if worker_factory is None:
            from kvconnect.registry import create_backend_worker as worker_factory  # noqa: N813
        self.engine_id = engine_id
        engine = EngineInfo(
            engine_id=engine_id,
            tp_size=1,
            tp_rank=0,
            block_sizes=(1,),
            num_kv_heads=1,
            # each rank its own engine: a fixed side_channel_port (mori_port) gives rank r port + r
            dp_rank=rank,
            model_signature={"sglang_kv_pool": signature},
        )
        self.worker = worker_factory(cfg, engine)
        try:
            self.worker.register_kv_caches(buffers)
        except BaseException:
            self.worker.shutdown()
            raise
        #: SGLang calls in from its scheduler and control threads; the worker takes one call at once
        self._calls = threading.Lock()
        handshake = self.worker.get_handshake_metadata() or {}
        self.host: str = handshake.get("host", "")
        self.port: int = int(handshake.get("port", 0))

    def room_request(
        self,
        room: int,
        endpoint: str,
        port: int,
        pages,
        aux_index: int | None,
        required_dst_info_num: int,
        decode_prefix_len: int,
    ) -> W.RoomRequest:
        """Decode: where ``room``'s KV goes on this rank (``pages`` None: a dummy rank)."""
        return W.RoomRequest(
            version=W.WIRE_VERSION,
            room=room,
            engine_id=self.engine_id,
            side_host=self.host,
            side_port=self.port,
            endpoint=endpoint,
            dst_port=port,
            kv_pages=b"" if pages is None else W.pack_pages(pages),
            aux_index=None if aux_index is None else int(aux_index),
            required_dst_info_num=required_dst_info_num,
            decode_prefix_len=decode_prefix_len,
            is_dummy=pages is None,
        )

    def ready(
        self, room: int, lease_id: str, src, dst, aux_index: int | None, rows: tuple[bytes, ...]
    ) -> W.Ready:
        """Prefill: tell a decode rank that ``src`` is leased as ``lease_id`` for its ``dst``."""
        return W.Ready(
            version=W.WIRE_VERSION,
            room=room,
            engine_id=self.engine_id,
            side_host=self.host,
            side_port=self.port,
            lease_id=lease_id,
            src_pages=W.pack_pages(src),
            dst_pages=W.pack_pages(dst),
            aux_index=aux_index,
            aux_rows=rows,
        )

    def lease(self, lease_id: str, pages: Sequence[int]) -> None:
        """Prefill: hold ``pages`` for one decode rank's write (checksummed now when verifying)."""
        spec = PW.LeaseSpec(request_id=lease_id, block_ids=(tuple(int(p) for p in pages),))
        with self._calls:
            self.worker.bind_step_metadata(PW.PDStepMetadata(leases=(spec,)))

    def load(self, request_id: str, ready: Any, src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
        """Decode: ask the prefill rank of ``ready`` (a :class:`~.wire.Ready`) to write its lease
        into ``dst_pages``; the outcome comes back through :meth:`take` under ``request_id``."""
        params = {
            "do_remote_prefill": True,
            "remote_request_id": ready.lease_id,
            "remote_engine_id": ready.engine_id,
            "remote_host": ready.side_host,
            "remote_port": ready.side_port,
            "tp_size": 1,
            "remote_block_ids": [int(p) for p in src_pages],
            "kvconnect_mode": "push",
        }
        req = PW.LoadRequest(
            request_id=request_id,
            params=params,
            local_block_ids=(tuple(int(p) for p in dst_pages),),
            token_start=0,
            token_end=len(dst_pages),
        )
        with self._calls:
            self.worker.bind_step_metadata(PW.PDStepMetadata(loads=(req,)))

    def take(self) -> TransferResults:
        with self._calls:
            return self.worker.get_transfer_results(set())

    def close(self) -> None:
        with self._calls:
            self.worker.shutdown()
