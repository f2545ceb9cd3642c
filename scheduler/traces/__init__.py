"""Routing traces: the on-disk trace store and importers for every format we read.

The store (:mod:`scheduler.traces.store`) is pure file I/O over numpy arrays; importers
(:mod:`scheduler.traces.importers`) turn real datasets and SGLang outputs into
:class:`~scheduler.traces.store.RequestTrace` records. No network code lives here.
"""

from scheduler.traces.store import (
    PHASES,
    RequestTrace,
    TraceBatch,
    TraceSet,
    TraceWriter,
    expert_counts,
)

__all__ = ["PHASES", "RequestTrace", "TraceBatch", "TraceSet", "TraceWriter", "expert_counts"]
