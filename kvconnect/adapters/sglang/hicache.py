"""kvconnect's storage tiers as an SGLang HiCache storage backend (L3), zero-copy v1 interface.

Select it with SGLang's ``dynamic`` storage backend; the ``kvconnect`` key holds kvconnect's own
config, one backend: ``cpu_offload`` (a slot pool in this process, :mod:`.hicache_cpu`) or
``mooncake`` (the shared tier on a Mooncake Store, every instance of a deployment reads what any
one stored, :mod:`.hicache_mooncake`)::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvconnect",
        "module_path": "kvconnect.adapters.sglang.hicache", "class_name": "KVConnectHiCacheStorage",
        "interface_v1": 1,
        "kvconnect": {"backend": "mooncake", "master_server_address": "127.0.0.1:50051"}}'

SGLang builds ``KVConnectHiCacheStorage(storage_config, kwargs)``, which returns the storage the
config's backend names (both share :mod:`.hicache_base`). SGLang hands it the host pool later
(``register_mem_pool_host``); only then is a page's size known. What SGLang calls, and from where
(its cache controller, one thread each):

* ``batch_exists(keys)`` (prefetch thread): how many leading pages of a chain are stored;
* ``batch_get_v1(keys, host_indices)`` (prefetch I/O thread): pages into the host pool; SGLang
  uses the leading ``True`` run and frees the rest of the pages only after the call returns;
* ``batch_set_v1(keys, host_indices)`` (backup thread): pages out of the host pool;
* ``get_stats()`` (scheduler, with ``--enable-hicache-storage-metrics``): pages and GB/s per call.

Keys are SGLang's page hashes (chained over the prefix, cache salt and LoRA included).
"""

from __future__ import annotations

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvconnect.adapters.sglang.hicache_base import CONFIG_KEY, KVConnectHiCacheBase, storage_config_of
from kvconnect.config import MooncakeConfig

__all__ = ["CONFIG_KEY", "KVConnectHiCacheStorage", "storage_config_of"]


class KVConnectHiCacheStorage(HiCacheStorage):
    """What SGLang constructs: builds the storage the config's backend names
    (:class:`~.hicache_cpu.CpuHiCacheStorage` or :class:`~.hicache_mooncake.MooncakeHiCacheStorage`,
    both :class:`~.hicache_base.KVConnectHiCacheBase`) and returns it instead."""

    def __new__(
        cls, storage_config: HiCacheStorageConfig, kwargs: dict | None = None
    ) -> KVConnectHiCacheBase:  # type: ignore[misc]
        if isinstance(storage_config_of(storage_config.extra_config), MooncakeConfig):
            from kvconnect.adapters.sglang.hicache_mooncake import MooncakeHiCacheStorage as impl
        else:
            from kvconnect.adapters.sglang.hicache_cpu import CpuHiCacheStorage as impl
        return impl(storage_config, kwargs)
