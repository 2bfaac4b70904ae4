"""SGLang adapter: kvconnect as an SGLang P/D transfer backend and as an SGLang HiCache storage
backend, from one ``pip install kvconnect`` and without patching SGLang.

* P/D transfer: the ``sglang.srt.plugins`` entry point (:func:`.plugin.register`) makes
  ``--disaggregation-transfer-backend kvconnect`` resolve to the classes in :mod:`.conn`
  (SGLang's own bootstrap and ``KVPoll`` state machine over kvconnect's P/D core, :mod:`.link`).
* HiCache storage: ``--hicache-storage-backend dynamic`` with
  ``{"backend_name": "kvconnect", "module_path": "kvconnect.adapters.sglang.hicache",
  "class_name": "KVConnectHiCacheStorage", "interface_v1": 1, "kvconnect": {...}}`` stores
  pages in kvconnect's host slot pool (:mod:`.hicache_cpu`) or on the Mooncake shared tier
  (:mod:`.hicache_mooncake`); :mod:`.hicache` picks one from the config.

Modules: ``plugin`` (registration, cheap to import), ``wire`` (pure), ``link`` (a rank's P/D
worker: config, KV pool description, leases and loads), ``conn`` (the SGLang classes),
``hicache*``. Only ``plugin`` and ``wire`` import without SGLang installed.
"""

from kvconnect.adapters.sglang.plugin import BACKEND_NAME, register

__all__ = ["BACKEND_NAME", "register"]
