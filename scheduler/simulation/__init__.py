"""Trace-replay simulation of request routing policies over time.

Pure: no network code, no environment; file reading lives in
:mod:`~scheduler.simulation.cli`. It shares the policies (:mod:`scheduler.policies`),
placements and accounting (:mod:`scheduler.accounting`) with the server; only the clock
(modelled step times) and the backend (recorded routed experts) differ.
"""

from scheduler.simulation.replay import (
    SimulationConfig,
    SimulationResult,
    SimulationSummary,
    simulate,
)
from scheduler.simulation.workload import Workload, load_workload

__all__ = [
    "SimulationConfig",
    "SimulationResult",
    "SimulationSummary",
    "Workload",
    "load_workload",
    "simulate",
]
