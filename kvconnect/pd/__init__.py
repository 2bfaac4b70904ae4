"""The P/D (prefill/decode disaggregation) core shared by every transfer backend.

A backend supplies only a :class:`~kvconnect.pd.transport.Transport`; the scheduler half
(:class:`PDScheduler`), the worker half (:class:`PDWorker`), handshakes, TP/block-size mapping,
leases and deadlines live here once.
"""

from kvconnect.pd.scheduler import PDScheduler
from kvconnect.pd.transport import Op, Status, Transport
from kvconnect.pd.worker import PDWorker

__all__ = ["Op", "PDScheduler", "PDWorker", "Status", "Transport"]
