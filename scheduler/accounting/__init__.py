"""Exact locality accounting of routed experts, and the modelled MoE-layer time.

Pure numpy: arrays in, dataclasses out; no network code, no environment, no file I/O.
The simulator, the server and the benchmarks share this one accounting.

* :mod:`~scheduler.accounting.dispatch`: SGLang's static replica choice as a table
  ``dest_gpu [ranks, layers, experts]``.
* :mod:`~scheduler.accounting.metrics`: remote hits, node copies, intra-node copies,
  bytes (total, per rank, per rank and step), GPU expert load and rank load imbalance,
  exactly, from per-token routed expert ids (docs/cost-model.md, "What is counted").
* :mod:`~scheduler.accounting.cost_model`: padded all-to-all time plus expert compute,
  calibrated on DeepEP's published numbers (docs/cost-model.md).
"""

from scheduler.accounting.cost_model import CostModel, LayerTime
from scheduler.accounting.dispatch import static_dispatch_table
from scheduler.accounting.metrics import (
    Accounting,
    BytesPerCopy,
    StepTraffic,
    account,
    bytes_per_copy,
)

__all__ = [
    "Accounting",
    "BytesPerCopy",
    "CostModel",
    "LayerTime",
    "StepTraffic",
    "account",
    "bytes_per_copy",
    "static_dispatch_table",
]
