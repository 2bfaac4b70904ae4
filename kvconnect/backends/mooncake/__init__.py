"""Shared KV tier on Mooncake Store: prefixes computed by any instance, served to every instance.

Modules: ``store`` (checked connection, one client per process, health back-off), ``keys``
(namespaced object keys), ``objects`` (one block of one rank per object: runs of engine memory
plus a verified header), ``transfer`` (the worker's I/O threads, put and get), ``groups``
(hybrid models: the host tier's KV-cache group rules applied to objects), ``messages`` (wire
types), ``scheduler`` (lookups, plans, KV cache events), ``worker``.
"""

from kvconnect.backends.mooncake.scheduler import MooncakeScheduler
from kvconnect.backends.mooncake.worker import MooncakeWorker

__all__ = ["MooncakeScheduler", "MooncakeWorker"]
