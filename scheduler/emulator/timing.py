"""How long an emulated request takes: the project's cost model over expected traffic.

Pure. The MoE physics is not modelled here: the destination of every (rank, layer,
expert) is :func:`scheduler.accounting.static_dispatch_table`, the bytes per copy
:func:`scheduler.accounting.bytes_per_copy` and the time of an MoE layer the accounting's
:class:`~scheduler.accounting.CostModel` (``all_to_all_us`` for dispatch and combine,
``expert_us`` for the experts). What this module adds is the emulator's use of them:

* **Expected traffic of a class on a rank** (:func:`expected_copies`, computed once per
  (class, rank) and cached by the emulator). From the class's inclusion probabilities
  ``pi [layers, experts]`` and the rank's row of the dispatch table, per MoE layer and
  token: the expected **node copies** (distinct other nodes reached, the accounting's
  definition in ``scheduler/accounting/metrics.py``), **intra-node copies** (distinct
  other GPUs of the rank's node reached) and **(token, expert) pairs**. Treating the
  experts of a token as drawn independently,
  ``E[node copies] = sum over other nodes n of 1 - prod over experts e reaching n of
  (1 - pi[e])``, and likewise per other GPU of the node. The sampler draws exactly
  ``top_k`` distinct experts (negatively correlated, not independent), so this slightly
  underestimates the copies when a node or GPU serves several likely experts: 2-7 %
  below the exact accounting of drawn tokens on the shipped profiles
  (tests/test_emulator_routing.py bounds it within 10 % below, never above).
* **A rank's decode step** (:meth:`EmulatorTiming.decode_step_s`): the rank's running
  requests' per-token expected traffic summed (one token each), then::

      step = step_fixed + moe_layers x (all_to_all_us(N x dispatch_B, I x dispatch_B)
                                        + all_to_all_us(N x combine_B, I x combine_B)
                                        + expert_us(P, distinct(P)))

  with ``N``, ``I``, ``P`` the batch's node copies, intra-node copies and pairs per MoE
  layer, averaged over the MoE layers (as ``CostModel.mean_layer_time`` does: a lower
  bound on per-layer padding of the NIC/NVLink maximum). The rank's GPU is taken to
  process as many pairs as its own tokens send (a balanced cluster), over the ``d``
  distinct experts it holds; the distinct experts it reads are estimated as
  ``d x (1 - exp(-P / d))`` (pairs spread evenly over its experts).
* **Prefill**: one forward pass of the prompt alone, the same formula with the prompt's
  tokens (the class's prefill traffic times the prompt length) plus
  ``prefill_token_us`` per prompt token.

A request's per-token time is the decode step of its rank's running set at its
admission (itself included), fixed from then on. Not modelled: padding to the busiest
rank of the cluster (each rank is timed on its own traffic), hot GPUs receiving more
pairs than their rank sends, batch changes after admission, chunked prefill, KV cache,
overlap of communication with compute. :class:`ServingOverheads` holds the non-MoE
costs, which are assumptions, not calibrated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from scheduler.accounting import BytesPerCopy, CostModel, bytes_per_copy
from scheduler.model_shape import ModelShape
from scheduler.placement import Placement


@dataclass(frozen=True)
class ServingOverheads:
    """The non-MoE part of a step; assumptions, not calibrated."""

    #: Fixed cost of one decode step outside the MoE layers: attention, dense layers,
    #: sampling, scheduling.
    step_fixed_ms: float = 5.0
    #: Non-MoE prefill cost per prompt token (attention, dense layers).
    prefill_token_us: float = 20.0

    def __post_init__(self) -> None:
        for name in ("step_fixed_ms", "prefill_token_us"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class TokenTraffic:
    """Expected traffic per MoE layer (averaged over the MoE layers): node copies,
    intra-node copies and (token, expert) pairs. Of one token, or summed over a batch."""

    node_copies: float = 0.0
    intra_node_copies: float = 0.0
    pairs: float = 0.0

    def __add__(self, other: TokenTraffic) -> TokenTraffic:
        return TokenTraffic(
            self.node_copies + other.node_copies,
            self.intra_node_copies + other.intra_node_copies,
            self.pairs + other.pairs,
        )

    def __sub__(self, other: TokenTraffic) -> TokenTraffic:
        return TokenTraffic(
            self.node_copies - other.node_copies,
            self.intra_node_copies - other.intra_node_copies,
            self.pairs - other.pairs,
        )

    def times(self, tokens: float) -> TokenTraffic:
        return TokenTraffic(
            self.node_copies * tokens, self.intra_node_copies * tokens, self.pairs * tokens
        )


@dataclass(frozen=True)
class LayerCopies:
    """Expected per-token traffic of one class on one rank, per MoE layer: node_copies,
    intra_node_copies, pairs [moe_layers]."""

    node_copies: np.ndarray
    intra_node_copies: np.ndarray
    pairs: np.ndarray

    def mean(self) -> TokenTraffic:
        return TokenTraffic(
            float(self.node_copies.mean()),
            float(self.intra_node_copies.mean()),
            float(self.pairs.mean()),
        )


def _expected_distinct(
    pi: np.ndarray, group: np.ndarray, mask: np.ndarray, groups: int
) -> np.ndarray:
    """Per layer: sum over groups g of 1 - prod over experts e of group g (where mask) of
    (1 - pi[e]). pi, group, mask: [layers, experts]."""
    layers = pi.shape[0]
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.clip(pi, 0.0, 1.0))  # -inf where pi == 1
    cell = (np.arange(layers)[:, None] * groups + group)[mask]
    sums = np.bincount(cell, weights=log_miss[mask], minlength=layers * groups)
    return (1.0 - np.exp(sums)).reshape(layers, groups).sum(axis=1)


def expected_copies(
    pi: np.ndarray, dest_gpu: np.ndarray, rank: int, nodes: int, gpus_per_node: int
) -> LayerCopies:
    """Expected per-token copies and pairs of tokens with inclusion probabilities
    ``pi [layers, experts]`` on ``rank`` of a ``nodes`` x ``gpus_per_node`` cluster, whose
    experts are reached on ``dest_gpu [layers, experts]`` (that rank's row of
    :func:`~scheduler.accounting.static_dispatch_table`)."""
    dest_node = dest_gpu // gpus_per_node
    own_node = dest_node == rank // gpus_per_node
    node = _expected_distinct(pi, dest_node, ~own_node, nodes)
    intra = _expected_distinct(
        pi, dest_gpu % gpus_per_node, own_node & (dest_gpu != rank), gpus_per_node
    )
    return LayerCopies(node, intra, pi.sum(axis=1))


def held_experts(placement: Placement) -> np.ndarray:
    """[gpus] distinct logical experts each GPU holds, averaged over the MoE layers."""
    held = (placement.replicas_per_gpu() > 0).sum(axis=1)  # [layers, gpus]
    return held.mean(axis=0)


@dataclass(frozen=True)
class EmulatorTiming:
    """The accounting's cost model applied to a rank's expected traffic (module doc).

    ``held [ranks]``: distinct experts on each rank's GPU (:func:`held_experts`)."""

    cost: CostModel
    model: ModelShape
    overheads: ServingOverheads
    held: np.ndarray

    @cached_property
    def size(self) -> BytesPerCopy:
        return bytes_per_copy(self.model.hidden_size)

    def moe_layer_us(self, traffic: TokenTraffic, rank: int) -> float:
        """One MoE layer of a step carrying ``traffic`` (summed over the step's tokens)."""
        size, cost = self.size, self.cost
        inter = max(traffic.node_copies, 0.0)
        intra = max(traffic.intra_node_copies, 0.0)
        pairs = max(traffic.pairs, 0.0)
        held = float(self.held[rank])
        distinct = held * -math.expm1(-pairs / held) if held > 0 else 0.0
        return (
            cost.all_to_all_us(inter * size.dispatch, intra * size.dispatch)
            + cost.all_to_all_us(inter * size.combine, intra * size.combine)
            + float(cost.expert_us(pairs, distinct, self.model))
        )

    def decode_step_s(self, batch: TokenTraffic, rank: int) -> float:
        """One decode step of ``rank`` whose running requests' traffic sums to ``batch``."""
        moe_us = self.model.num_moe_layers * self.moe_layer_us(batch, rank)
        return (self.overheads.step_fixed_ms * 1e3 + moe_us) / 1e6

    def prefill_s(self, prompt_tokens: int, per_token: TokenTraffic, rank: int) -> float:
        """One forward pass over ``prompt_tokens`` tokens of ``per_token`` traffic each."""
        moe_us = self.model.num_moe_layers * self.moe_layer_us(per_token.times(prompt_tokens), rank)
        fixed_us = self.overheads.step_fixed_ms * 1e3
        return (fixed_us + prompt_tokens * self.overheads.prefill_token_us + moe_us) / 1e6
