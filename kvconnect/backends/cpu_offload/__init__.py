"""CPU offload backend: a host-memory KV tier with prefix hits.

The scheduler half (:class:`CpuOffloadScheduler`) owns the prefix index and plans copies; the
worker half (:class:`CpuOffloadWorker`) owns the host pool and runs them. Modules: ``hashing``
(prefix keys), ``policies`` (eviction), ``index`` (slots, pins), ``sizing`` (slot count agreed by
both halves), ``messages`` (wire types), ``rows`` and ``copier`` (the bytes), ``scheduler``,
``worker``, ``stats`` (every stat it reports). The scheduler half publishes the tier's KV cache
events through :class:`kvconnect.events.TierEvents`, told by the index what enters and leaves.
"""

from kvconnect.backends.cpu_offload.scheduler import CpuOffloadScheduler
from kvconnect.backends.cpu_offload.worker import CpuOffloadWorker

__all__ = ["CpuOffloadScheduler", "CpuOffloadWorker"]
