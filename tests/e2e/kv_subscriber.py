"""A cache-aware router's view of one vLLM instance, built only from vLLM's published KV cache
event types (``KVEventBatch`` over ZMQ, msgpack): the engine block hashes it holds, per medium."""

from __future__ import annotations

import json
import threading

import msgspec
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from kvconnect.testing import servers as S


class Subscriber:
    """A router's view of one instance: the engine's block hashes it holds, per medium."""

    def __init__(self, endpoint: str) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.bind(endpoint)  # vLLM's publisher connects to a non-wildcard endpoint
        self._decode = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._lock = threading.Lock()
        self.held: dict[str, set[int]] = {}
        #: (medium, block tokens) -> hash, for every BlockStored seen
        self.by_tokens: dict[tuple[str, tuple[int, ...]], int] = {}
        self.stored_events: dict[str, int] = {}
        self.removed: dict[str, set[int]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            _topic, _seq, payload = self._sock.recv_multipart()
            batch = self._decode.decode(payload)
            with self._lock:
                for ev in batch.events:
                    self._apply(ev)

    def _apply(self, ev) -> None:
        if isinstance(ev, BlockStored):
            m = ev.medium
            held = self.held.setdefault(m, set())
            self.stored_events[m] = self.stored_events.get(m, 0) + 1
            for i, h in enumerate(ev.block_hashes):
                if m == "CPU" and h in held:
                    self.errors.append(f"CPU block {h} stored twice without a removal")
                held.add(h)
                toks = tuple(ev.token_ids[i * ev.block_size:(i + 1) * ev.block_size])
                self.by_tokens[(m, toks)] = h
        elif isinstance(ev, BlockRemoved):
            held = self.held.setdefault(ev.medium, set())
            for h in ev.block_hashes:
                if ev.medium == "CPU" and h not in held:
                    self.errors.append(f"CPU block {h} removed but never stored")
                held.discard(h)
                self.removed.setdefault(ev.medium, set()).add(h)
        elif isinstance(ev, AllBlocksCleared):
            # It names no medium; vLLM emits it only when its device prefix cache is reset
            # (kvconnect's tiers report what they drop as BlockRemoved), so the device index goes.
            for m, held in self.held.items():
                if m != "CPU":
                    held.clear()

    def snapshot(self):
        with self._lock:
            return ({m: set(h) for m, h in self.held.items()}, dict(self.by_tokens),
                    {m: set(h) for m, h in self.removed.items()}, dict(self.stored_events), list(self.errors))

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()


def subscribed() -> tuple[Subscriber, list[str]]:
    """A subscriber on a free loopback port, and the vLLM server arguments that publish to it."""
    endpoint = f"tcp://127.0.0.1:{S.free_port()}"
    cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
    return Subscriber(endpoint), ["--kv-events-config", json.dumps(cfg)]
