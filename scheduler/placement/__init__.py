"""Expert placement: which expert replicas live on which GPU, and which request classes
each node serves.

Pure: arrays in, arrays out; no network code, no environment. File I/O lives only in
:mod:`~scheduler.placement.io` (SGLang's ``--init-expert-location`` JSON, ``plan.json``,
topology TOML). Methods are chosen by name through :func:`~scheduler.placement.methods.get_method`.
"""

from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology

__all__ = ["Placement", "Topology"]
