"""HiCache storage on kvconnect's host tier (``"kvconnect": {"backend": "cpu_offload", ...}``).

The slot pool is allocated when SGLang hands over the host pool (``register_mem_pool_host``):
``cpu_bytes_to_use`` (split over TP ranks unless ``per_rank``) divided by the bytes of one page.
Slots, prefix lookups, pins and eviction are kvconnect's
:class:`~kvconnect.backends.cpu_offload.index.SlotIndex` with its LRU/ARC policy.

``batch_set_v1`` / ``batch_get_v1`` copy between the host pool's pages (located by the pool's own
``get_page_buffer_meta``) and slots, outside the index lock, one ``memmove`` per run that is
contiguous on both sides (a page-first MLA page is one run, and consecutive pages into
consecutive slots are one run together); the slots being copied are pinned, so
eviction under capacity pressure never takes a page that is being read or written. A page that
does not fit (every slot pinned) reports False, which SGLang treats as "not stored".
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

from kvconnect.adapters.sglang.hicache_base import KVConnectHiCacheBase
from kvconnect.backends.cpu_offload.index import SlotIndex
from kvconnect.backends.cpu_offload.policies import make_policy
from kvconnect.backends.cpu_offload.sizing import slot_count
from kvconnect.config import CpuOffloadConfig
from kvconnect.errors import ConfigError
from kvconnect.layout import merge_segments

logger = logging.getLogger(__name__)


def _copy_runs(segments: list[tuple[int, int, int]]) -> None:
    """``memmove`` each ``(src, dst, nbytes)``, merged first where both sides continue."""
    if segments:
        for src, dst, n in merge_segments(np.asarray(segments, dtype=np.int64)).tolist():
            ctypes.memmove(dst, src, n)


class CpuHiCacheStorage(KVConnectHiCacheBase):
    COUNTERS = ("set_pages", "get_pages", "hits", "misses", "rejected")

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        super().__init__(storage_config, kwargs)
        if not isinstance(self.cfg, CpuOffloadConfig):
            raise ConfigError(
                f"CpuHiCacheStorage runs the 'cpu_offload' backend, got {type(self.cfg).__name__}"
            )
        self._lock = threading.Lock()
        self._index: SlotIndex | None = None
        self._slots: torch.Tensor | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        tp = max(1, int(self.storage_config.tp_size))
        n = slot_count(self.cfg, tp, self.page_bytes)
        with self._lock:
            self._slots = torch.empty((n, self.page_bytes), dtype=torch.uint8)
            self._index = SlotIndex(n, make_policy(self.cfg.eviction_policy, n))
        logger.info("kvconnect HiCache storage: %d slots of %d bytes (%s eviction)", n, self.page_bytes,
                    self.cfg.eviction_policy)

    @property
    def num_slots(self) -> int:
        return 0 if self._index is None else self._index.num_slots

    def _ready(self) -> SlotIndex:
        if self._index is None:
            raise RuntimeError(
                "kvconnect HiCache storage: no host pool registered yet (register_mem_pool_host)"
            )
        return self._index

    def _slot_ptr(self, slot: int) -> int:
        return self._slots.data_ptr() + slot * self.page_bytes  # type: ignore[union-attr]

    def _slot_pieces(self, slot: int, pieces: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """``(page address, slot address, nbytes)`` of one page's pieces, laid end to end in the slot."""
        out, at = [], self._slot_ptr(slot)
        for addr, nbytes in pieces:
            out.append((int(addr), at, int(nbytes)))
            at += int(nbytes)
        return out

    # -- zero-copy interface (SGLang passes page keys and host-pool token indices) ------------------
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        t0 = time.perf_counter()
        index = self._ready()
        pieces = self._page_pieces(keys, host_indices)
        ok = [False] * len(keys)
        todo: dict[bytes, int] = {}
        with self._lock:
            for i, key in enumerate(keys):
                kb = key.encode()
                if kb in index:
                    ok[i] = True  # stored, or being stored by another call
                elif kb not in todo:
                    todo[kb] = i
            new_keys = list(todo)
            slots = index.reserve(new_keys)
        stored = new_keys[: len(slots)]
        _copy_runs([(addr, dst, n) for kb, slot in zip(stored, slots)
                    for addr, dst, n in self._slot_pieces(slot, pieces[todo[kb]])])
        with self._lock:
            index.commit(slots, stored)
        for kb in stored:
            ok[todo[kb]] = True
        for i, key in enumerate(keys):  # a key repeated in one batch shares its first copy's fate
            kb = key.encode()
            if kb in todo and todo[kb] != i:
                ok[i] = ok[todo[kb]]
        self.counters.add(set_pages=len(stored), rejected=len(new_keys) - len(stored))
        self._record("backup", len(stored), t0)
        return ok

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        t0 = time.perf_counter()
        index = self._ready()
        pieces = self._page_pieces(keys, host_indices)
        with self._lock:
            slots = index.ready_prefix([k.encode() for k in keys])
            index.pin(slots)
            index.touch(slots)
        try:
            _copy_runs([(src, addr, n) for i, slot in enumerate(slots)
                        for addr, src, n in self._slot_pieces(slot, pieces[i])])
        finally:
            with self._lock:
                index.unpin(slots)
        self.counters.add(get_pages=len(slots), hits=len(slots), misses=len(keys) - len(slots))
        self._record("prefetch", len(slots), t0)
        return [True] * len(slots) + [False] * (len(keys) - len(slots))

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        index = self._ready()
        with self._lock:
            return len(index.ready_prefix([k.encode() for k in keys]))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- copying interface (flat page tensors) ------------------------------------------------------
    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None
    ) -> bool:
        index = self._ready()
        values = list(values or [])
        if len(values) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        for v in values:
            if v.numel() * v.element_size() != self.page_bytes:
                raise ValueError(
                    f"a page of {v.numel() * v.element_size()} bytes; this store holds {self.page_bytes}"
                )
        with self._lock:
            fresh = {k.encode(): v for k, v in zip(keys, values) if k.encode() not in index}
            new_keys = list(fresh)
            slots = index.reserve(new_keys)
        for kb, slot in zip(new_keys, slots):
            self._slots[slot].copy_(fresh[kb].contiguous().view(-1).view(torch.uint8))  # type: ignore[index]
        with self._lock:
            index.commit(slots, new_keys[: len(slots)])
        self.counters.add(set_pages=len(slots), rejected=len(new_keys) - len(slots))
        return len(slots) == len(new_keys)

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[torch.Tensor | None]:
        index = self._ready()
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        out: list[torch.Tensor | None] = [None] * len(keys)
        with self._lock:
            slots = index.ready_prefix([k.encode() for k in keys])
            index.pin(slots)
            index.touch(slots)
        try:
            for i, slot in enumerate(slots):
                data = self._slots[slot]  # type: ignore[index]
                t = targets[i]
                if t is None:
                    out[i] = data.clone()
                else:
                    t.view(-1).view(torch.uint8).copy_(data)
                    out[i] = t
        finally:
            with self._lock:
                index.unpin(slots)
        return out

    def clear(self) -> None:
        with self._lock:
            if self._index is not None:
                n = self._index.num_slots
                self._index = SlotIndex(n, make_policy(self.cfg.eviction_policy, n))
