"""What kvconnect's HiCache storages share: the ``kvconnect`` config entry, thread-safe counters,
a page's pieces in the host pool, and SGLang's storage metrics. The storages themselves:
:mod:`.hicache_cpu`, :mod:`.hicache_mooncake`; :mod:`.hicache` is what SGLang names."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvconnect.config import CpuOffloadConfig, MooncakeConfig, parse_config
from kvconnect.errors import ConfigError

logger = logging.getLogger(__name__)

CONFIG_KEY = "kvconnect"


def storage_config_of(extra_config: dict | None) -> CpuOffloadConfig | MooncakeConfig:
    """kvconnect's tier config from SGLang's ``--hicache-storage-backend-extra-config``."""
    raw = (extra_config or {}).get(CONFIG_KEY)
    if raw is None:
        raise ConfigError(
            f"--hicache-storage-backend-extra-config needs a '{CONFIG_KEY}' object, e.g. "
            '"kvconnect": {"backend": "cpu_offload", "cpu_bytes_to_use": 8000000000}'
        )
    cfg = parse_config(raw)
    if len(cfg.backends) != 1 or not isinstance(cfg.backends[0], (CpuOffloadConfig, MooncakeConfig)):
        raise ConfigError(
            f"'{CONFIG_KEY}' for HiCache storage takes one 'cpu_offload' or 'mooncake' backend, "
            f"got {cfg.names}"
        )
    return cfg.backends[0]


class Counters:
    """Thread-safe counters (SGLang calls a storage from several threads)."""

    def __init__(self, names: Sequence[str]) -> None:
        self._lock = threading.Lock()
        self._v: dict[str, float] = dict.fromkeys(names, 0)

    def add(self, **kv: float) -> None:
        """Add to declared counters (a name not declared raises KeyError)."""
        with self._lock:
            for k, v in kv.items():
                self._v[k] += v

    def __getitem__(self, name: str) -> float:
        return self._v[name]

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._v)


class KVConnectHiCacheBase(HiCacheStorage):
    """Base of kvconnect's HiCache storages: page addressing and SGLang's storage metrics."""

    COUNTERS: tuple[str, ...] = ()

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None) -> None:
        self.storage_config = storage_config
        self.cfg: Any = storage_config_of(storage_config.extra_config)
        self.page_bytes = 0
        self.counters = Counters(self.COUNTERS)
        self._metrics_lock = threading.Lock()
        self._metrics: dict[str, list[float]] = {k: [] for k in ("prefetch_pgs", "backup_pgs",
                                                                 "prefetch_bandwidth", "backup_bandwidth")}

    @property
    def stats(self) -> dict[str, float]:
        return self.counters.snapshot()

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        page = torch.arange(mem_pool_host.page_size, dtype=torch.int64)
        _, sizes = mem_pool_host.get_page_buffer_meta(page)
        self.page_bytes = int(sum(sizes))

    def _page_pieces(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per key, the ``(address, nbytes)`` pieces of its host page, in the pool's order."""
        n = len(keys)
        if n == 0:
            return []
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if len(ptrs) % n or sum(sizes) != n * self.page_bytes:
            raise ValueError(
                f"{len(host_indices)} host indices give {len(ptrs)} pieces / {sum(sizes)} bytes, "
                f"not {n} pages of {self.page_bytes} bytes"
            )
        k = len(ptrs) // n
        return [list(zip(ptrs[i * k:(i + 1) * k], sizes[i * k:(i + 1) * k])) for i in range(n)]

    # -- SGLang's storage metrics (--enable-hicache-storage-metrics) --------------------------------
    def _record(self, kind: str, pages: int, t0: float) -> None:
        """One get (``prefetch``) or set (``backup``) call of ``pages`` pages that began at ``t0``."""
        if not pages or not self.storage_config.enable_storage_metrics:
            return
        dt = max(time.perf_counter() - t0, 1e-9)
        with self._metrics_lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(pages * self.page_bytes / dt / (1 << 30))

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the last call (None when SGLang has no such type)."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except ImportError:
            return None
        with self._metrics_lock:
            taken = {k: list(v) for k, v in self._metrics.items()}
            for v in self._metrics.values():
                v.clear()
        return StorageMetrics(**taken)
