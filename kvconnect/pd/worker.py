"""The worker half of P/D transfer, shared by every transport.

The engine thread only registers the caches once, enqueues each step's metadata and drains
finished results: nothing here blocks on the network or on a transfer. Three threads do the rest:

* the **progress thread** (:mod:`kvconnect.pd.progress`) owns the transport;
* the **control thread** (:mod:`kvconnect.pd.control`) makes blocking side-channel requests;
* the **side-channel listener** (:class:`kvconnect.handshake.SideChannelServer`) at
  ``side_channel_port + dp_rank * tp_size + tp_rank`` answers ``metadata`` (this worker's
  :class:`~kvconnect.metadata.HandshakeMetadata`) and ``write`` (push-mode write requests).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kvconnect.api import EngineInfo, TransferResults, WorkerConnector
from kvconnect.config import PDConfig
from kvconnect.errors import LayoutError, WireError
from kvconnect.handshake import SideChannelServer
from kvconnect.layout import KVLayout
from kvconnect.metadata import HandshakeMetadata, LayerRegion, compat_hash, decode, encode
from kvconnect.pd import plan as P
from kvconnect.pd import wire as W
from kvconnect.pd.control import ControlThread
from kvconnect.pd.messages import StepMeta, WriteRequested
from kvconnect.pd.peers import LocalSide
from kvconnect.pd.progress import ProgressLoop, decode_write_request
from kvconnect.pd.scheduler import advertised_host, base_port
from kvconnect.pd.transport import Transport

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _version

    _KVCONNECT_VERSION = _version("kvconnect")
except Exception:  # pragma: no cover - not installed as a distribution
    _KVCONNECT_VERSION = ""


def signature(engine: EngineInfo, layouts: list[KVLayout]) -> dict[str, Any]:
    """What two peers must share, independent of TP size, block size and block count."""
    return {
        **dict(engine.model_signature),
        "kv_layers": [list(lay.signature()) + [lay.group] for lay in layouts],
        "kv_groups": len(engine.block_sizes),
    }


class PDWorker(WorkerConnector):
    supports_hybrid = True

    def __init__(
        self, config: PDConfig, engine: EngineInfo, transport_factory: Callable[[str], Transport]
    ) -> None:
        self._cfg = config
        self._engine = engine
        self._make_transport = transport_factory
        self._transport: Transport | None = None
        self._server: SideChannelServer | None = None
        self._control: ControlThread | None = None
        self._loop: ProgressLoop | None = None
        self._host = advertised_host(config)
        self._base_port = base_port(config, engine)
        #: side_channel_port 0: every worker takes a free port (peers must learn it from messages)
        self._port = self._base_port + engine.tp_rank if config.side_channel_port else 0
        self._md_bytes = b""
        if config.handshake_timeout_s + config.transfer_timeout_s >= config.lease_timeout_s:
            logger.warning(
                "lease_timeout_s (%g) is not above handshake_timeout_s + transfer_timeout_s (%g): a "
                "producer may free blocks a consumer is still reading%s", config.lease_timeout_s,
                config.handshake_timeout_s + config.transfer_timeout_s,
                "" if config.verify_checksums else " (verify_checksums would catch it)")

    def register_kv_caches(self, caches: Mapping[str, tuple[torch.Tensor, KVLayout]]) -> None:
        if self._loop is not None:
            raise RuntimeError("register_kv_caches was already called")
        if not caches:
            raise LayoutError("register_kv_caches got no KV cache tensors")
        e = self._engine
        regions_in, layouts, devices = [], [], set()
        for name, (tensor, lay) in caches.items():
            if tuple(tensor.shape) != lay.shape or tuple(tensor.stride()) != lay.strides:
                raise LayoutError(f"layer {name!r}: tensor shape/strides differ from its layout")
            if lay.group >= len(e.block_sizes):
                raise LayoutError(
                    f"layer {name!r} is in KV-cache group {lay.group}; the engine has {len(e.block_sizes)}"
                )
            devices.add(str(tensor.device))
            layouts.append(lay)
            regions_in.append(LayerRegion(
                name=name, base_addr=int(tensor.data_ptr()), dims=lay.dims, shape=lay.shape,
                strides=lay.strides, itemsize=lay.itemsize, dtype=lay.dtype, group=lay.group,
            ))
        if len(devices) != 1:
            raise LayoutError(f"KV caches live on several devices {sorted(devices)}; one worker needs one")
        mla = all(lay.is_mla for lay in layouts)
        if not mla and any(lay.is_mla for lay in layouts):
            raise LayoutError("a model mixing MLA and per-head KV layers is not supported")
        num_heads = e.num_kv_heads or (1 if mla else layouts[0].num_heads * e.tp_size)
        regions, placed = P.place_layers(regions_in)
        P.check_heads(num_heads, e.tp_size, e.tp_rank, placed, "this worker")
        chash = compat_hash(signature(e, layouts))
        # Unique per start: NIXL refuses a peer's metadata under a name it still holds from the
        # peer's earlier incarnation (an instance restarted with a fixed engine_id).
        agent = f"{e.engine_id}-dp{e.dp_rank}-tp{e.tp_rank}-{uuid.uuid4().hex[:12]}"
        transport = self._make_transport(agent)
        transport.register(regions, devices.pop())
        self._transport = transport
        md = HandshakeMetadata(
            engine_id=e.engine_id, tp_rank=e.tp_rank, tp_size=e.tp_size, compat_hash=chash,
            block_sizes=tuple(e.block_sizes), layers=tuple(regions_in), transport=transport.name,
            transport_metadata=transport.metadata(), agent_name=transport.agent_name,
            kvconnect_version=_KVCONNECT_VERSION,
        )
        self._md_bytes = encode(md)
        if self._port == 0:  # ephemeral: for engines whose peers learn the port from messages (SGLang)
            self._server = self._listen()
            self._port = self._server.port
            self._base_port = self._port - e.tp_rank
        local = LocalSide(
            engine_id=e.engine_id, tp_size=e.tp_size, tp_rank=e.tp_rank, num_heads=num_heads, mla=mla,
            block_sizes=tuple(e.block_sizes), placed=placed, compat_hash=chash,
            host=self._host, port=self._port, base_port=self._base_port,
            layers=[(t, lay) for t, lay in caches.values()],
        )
        self._control = ControlThread(self._cfg.secret, self._cfg.handshake_timeout_s)
        self._loop = ProgressLoop(transport, local, self._cfg, self._control)
        self._loop.start()
        if self._server is None:
            self._server = self._listen()
        logger.info("kvconnect P/D worker %s rank %d/%d: %d layers, %d regions, side channel %s:%d",
                    e.engine_id, e.tp_rank, e.tp_size, len(placed), len(regions), self._host, self._port)

    def _listen(self) -> SideChannelServer:
        return SideChannelServer(
            self._cfg.side_channel_host,
            self._port,
            {
                "metadata": self._serve_metadata,
                "write": self._serve_write,
                "checksums": self._serve_checksums,
            },
            secret=self._cfg.secret,
        )

    # -- side-channel handlers (listener thread) ---------------------------------------------------
    def _serve_metadata(self, body: bytes) -> bytes:
        return self._md_bytes

    def _serve_write(self, body: bytes) -> bytes:
        wr = decode_write_request(body)  # WireError -> a clear refusal to the sender
        if self._loop is None:
            raise WireError("this worker is still starting")
        self._loop.post(WriteRequested(wr))
        return b"ok"

    def _serve_checksums(self, body: bytes) -> bytes:
        req = decode(body, W.ChecksumRequest, what="checksum request")
        if self._loop is None:
            raise WireError("this worker is still starting")
        return self._loop.checksums_of(req.request_id)  # WireError -> a clear refusal

    @property
    def side_channel_stats(self) -> dict[str, int]:
        """The listener's counters (``requests``, ``rejected_auth``, ``rejected_garbage``, ...)."""
        return dict(self._server.stats) if self._server is not None else {}

    # -- engine thread ------------------------------------------------------------------------------
    def bind_step_metadata(self, metadata: Any) -> None:
        if metadata is None:
            return
        if not isinstance(metadata, W.PDStepMetadata):
            raise TypeError(f"P/D worker got step metadata of type {type(metadata).__name__}")
        if metadata.is_empty():
            return
        if self._loop is None:
            raise RuntimeError("step metadata arrived before register_kv_caches")
        if metadata.aborts:
            self._loop.abort_loads(metadata.aborts)
        self._loop.post(StepMeta(metadata))

    def get_transfer_results(self, finished_request_ids: set[str]) -> TransferResults:
        if self._loop is None:
            return TransferResults()
        return self._loop.take_results()

    def get_handshake_metadata(self) -> dict[str, Any] | None:
        if self._loop is None:
            return None
        e = self._engine
        return {"engine_id": e.engine_id, "tp_rank": e.tp_rank, "host": self._host, "port": self._port}

    @property
    def port(self) -> int:
        return self._port

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._transport is not None:
            try:
                self._transport.close()
            except Exception:
                logger.debug("closing the transport failed", exc_info=True)
            self._transport = None
