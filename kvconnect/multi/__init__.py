"""The MultiConnector: composes any connectors (e.g. NIXL P/D plus CPU offload) behind one.

Loads come from the first child that has a hit, stores go to every child, completions are
counted per child. :mod:`kvconnect.multi.scheduler` states every rule; the per-child completion
counting is explained in :mod:`kvconnect.multi.completion`.
"""

from kvconnect.multi.completion import CompletionTracker
from kvconnect.multi.metadata import LoadNote, MultiStepMetadata, child_names
from kvconnect.multi.scheduler import MultiScheduler
from kvconnect.multi.worker import MultiWorker

__all__ = [
    "CompletionTracker",
    "LoadNote",
    "MultiScheduler",
    "MultiStepMetadata",
    "MultiWorker",
    "child_names",
]
