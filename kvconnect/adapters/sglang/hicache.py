"""kvconnect's host tier as an SGLang HiCache storage backend (L3), zero-copy v1 interface.

Select it with SGLang's ``dynamic`` storage backend; the ``kvconnect`` key holds kvconnect's own
config (today one ``cpu_offload`` backend; further tiers compose in the same list later)::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvconnect",
        "module_path": "kvconnect.adapters.sglang.hicache", "class_name": "KVConnectHiCacheStorage",
        "interface_v1": 1,
        "kvconnect": {"backend": "cpu_offload", "cpu_bytes_to_use": 8000000000}}'

SGLang builds ``KVConnectHiCacheStorage(storage_config, kwargs)`` and later hands it the host pool
(``register_mem_pool_host``); only then is a page's size known and the slot pool allocated:
``cpu_bytes_to_use`` (split over TP ranks unless ``per_rank``) divided by the bytes of one page.
Keys are SGLang's page hashes; slots, prefix lookups, pins and eviction are kvconnect's
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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvconnect.backends.cpu_offload.index import SlotIndex
from kvconnect.backends.cpu_offload.policies import make_policy
from kvconnect.backends.cpu_offload.sizing import slot_count
from kvconnect.config import CpuOffloadConfig, parse_config
from kvconnect.errors import ConfigError
from kvconnect.layout import merge_segments

logger = logging.getLogger(__name__)

CONFIG_KEY = "kvconnect"


def storage_config_of(extra_config: dict | None) -> CpuOffloadConfig:
    """kvconnect's tier config from SGLang's ``--hicache-storage-backend-extra-config``."""
    raw = (extra_config or {}).get(CONFIG_KEY)
    if raw is None:
        raise ConfigError(
            f"--hicache-storage-backend-extra-config needs a '{CONFIG_KEY}' object, e.g. "
            '"kvconnect": {"backend": "cpu_offload", "cpu_bytes_to_use": 8000000000}'
        )
    cfg = parse_config(raw)
    if len(cfg.backends) != 1 or not isinstance(cfg.backends[0], CpuOffloadConfig):
        raise ConfigError(
            f"'{CONFIG_KEY}' for HiCache storage takes one 'cpu_offload' backend, got {cfg.names}"
        )
    return cfg.backends[0]


def _copy_runs(segments: list[tuple[int, int, int]]) -> None:
    """``memmove`` each ``(src, dst, nbytes)``, merged first where both sides continue."""
    if segments:
        for src, dst, n in merge_segments(np.asarray(segments, dtype=np.int64)).tolist():
            ctypes.memmove(dst, src, n)


class KVConnectHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        self.storage_config = storage_config
        self.cfg = storage_config_of(storage_config.extra_config)
        self._lock = threading.Lock()
        self._index: SlotIndex | None = None
        self._slots: torch.Tensor | None = None
        self.page_bytes = 0
        self.stats = {"set_pages": 0, "get_pages": 0, "hits": 0, "misses": 0, "rejected": 0}

    # -- set-up -------------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        page = torch.arange(mem_pool_host.page_size, dtype=torch.int64)
        _, sizes = mem_pool_host.get_page_buffer_meta(page)
        page_bytes = int(sum(sizes))
        tp = max(1, int(self.storage_config.tp_size))
        n = slot_count(self.cfg, tp, page_bytes)
        with self._lock:
            self.page_bytes = page_bytes
            self._slots = torch.empty((n, page_bytes), dtype=torch.uint8)
            self._index = SlotIndex(n, make_policy(self.cfg.eviction_policy, n))
        logger.info("kvconnect HiCache storage: %d slots of %d bytes (%s eviction)", n, page_bytes, self.cfg.eviction_policy)

    @property
    def num_slots(self) -> int:
        return 0 if self._index is None else self._index.num_slots

    def _ready(self) -> SlotIndex:
        if self._index is None:
            raise RuntimeError("kvconnect HiCache storage: no host pool registered yet (register_mem_pool_host)")
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

    def _page_pieces(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per key, the ``(address, nbytes)`` pieces of its host page, in the pool's order."""
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        n = len(keys)
        if n == 0:
            return []
        if len(ptrs) % n or sum(sizes) != n * self.page_bytes:
            raise ValueError(
                f"{len(host_indices)} host indices give {len(ptrs)} pieces / {sum(sizes)} bytes, "
                f"not {n} pages of {self.page_bytes} bytes"
            )
        k = len(ptrs) // n
        return [list(zip(ptrs[i * k:(i + 1) * k], sizes[i * k:(i + 1) * k])) for i in range(n)]

    # -- zero-copy interface (SGLang passes page keys and host-pool token indices) ------------------
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
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
        self.stats["set_pages"] += len(stored)
        self.stats["rejected"] += len(new_keys) - len(stored)
        return ok

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
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
        self.stats["get_pages"] += len(slots)
        self.stats["hits"] += len(slots)
        self.stats["misses"] += len(keys) - len(slots)
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

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        index = self._ready()
        values = list(values or [])
        if len(values) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        for v in values:
            if v.numel() * v.element_size() != self.page_bytes:
                raise ValueError(f"a page of {v.numel() * v.element_size()} bytes; this store holds {self.page_bytes}")
        with self._lock:
            fresh = {k.encode(): v for k, v in zip(keys, values) if k.encode() not in index}
            new_keys = list(fresh)
            slots = index.reserve(new_keys)
        for kb, slot in zip(new_keys, slots):
            self._slots[slot].copy_(fresh[kb].contiguous().view(-1).view(torch.uint8))  # type: ignore[index]
        with self._lock:
            index.commit(slots, new_keys[: len(slots)])
        self.stats["set_pages"] += len(slots)
        self.stats["rejected"] += len(new_keys) - len(slots)
        return len(slots) == len(new_keys)

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[torch.Tensor | None]:
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
