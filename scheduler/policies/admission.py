"""Admission: when queued requests are decided, and how, for the simulator and the server.

One pure routine (no clock reads, no asyncio) shared by the server's dispatcher
(:class:`scheduler.server.dispatcher.Dispatcher`) and the simulator
(:func:`scheduler.simulation.replay.simulate`), so the two differ only by their clock
and their backend. A caller keeps one FIFO queue of requests, oldest first, and:

1. **When.** :meth:`Admission.due` gives the time the next decision is due from the
   oldest queued request's enqueue time and the queue length: with ``window_s = 0`` at
   once; otherwise when the oldest has waited ``window_s`` or the queue holds
   ``max_window`` requests, whichever comes first.
2. **What.** :meth:`Admission.decide` gives one rank, or None (stays queued), to each of
   the first ``max_window`` queued requests:

   * ``window_s = 0``: the queued requests go to
     :meth:`~scheduler.policies.RoutingPolicy.choose_ranks` (whose default asks
     ``choose_rank`` head first, each seeing the previous ones' assignments; a window
     policy answers jointly, in one solve, as a backlog needs), and the answer is cut at
     its first None, so nobody overtakes a waiting head (strict FIFO). A single request
     goes to ``choose_rank`` (the server's fast path).
   * ``window_s > 0``: the window goes to
     :meth:`~scheduler.policies.RoutingPolicy.choose_ranks` jointly (whose default asks
     ``choose_rank`` in order, and may let a later request pass an earlier one answered
     None); those answered None stay queued, in order.

   The policy's answer is checked (one entry per request, each rank in range, no rank
   past its capacity): :class:`PolicyContractError` otherwise.
3. **Again.** After a decision that assigned someone, with requests still queued, the
   caller decides again as soon as :meth:`Admission.due` says so (usually at once),
   before anything else changes; after a decision that assigned nobody it waits for a
   change (an arrival, a slot released, a rank's state). The dispatcher does this by
   waking its loop; the simulator by looping between two steps of its modelled clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy


class PolicyContractError(AssertionError):
    """A policy answered something its contract forbids (a bug in the policy)."""


@dataclass(frozen=True)
class Admission:
    """``window_s``: how long the oldest queued request waits for others to be decided
    with it (0: each decided at once, strict FIFO); ``max_window``: the most requests
    decided together (a full window is decided at once)."""

    window_s: float = 0.0
    max_window: int = 256

    def __post_init__(self) -> None:
        if not (self.window_s >= 0 and math.isfinite(self.window_s)):
            raise ValueError(f"window_s must be >= 0 and finite, got {self.window_s}")
        if self.max_window < 1:
            raise ValueError(f"max_window must be >= 1, got {self.max_window}")

    def immediate(self, queued: int) -> bool:
        """A queue of ``queued`` requests is due as soon as it forms (window 0, or the
        window is full)."""
        return self.window_s == 0 or queued >= self.max_window

    def due(self, oldest_enqueued: float, queued: int) -> float:
        """When the next decision is due, on the caller's clock, for a queue of ``queued``
        (>= 1) requests whose oldest was enqueued at ``oldest_enqueued``.

        ``oldest_enqueued`` itself (never after now: decide at once) when the window is 0
        or the queue holds ``max_window`` requests, else ``oldest_enqueued + window_s``.
        """
        if self.immediate(queued):
            return oldest_enqueued
        return oldest_enqueued + self.window_s

    def decide(
        self, policy: RoutingPolicy, requests: Sequence[RequestInfo], ranks: RankState
    ) -> list[int | None]:
        """Ranks for the first ``max_window`` of the queued ``requests`` (oldest first):
        one entry per request of the window, None where it stays queued. ``ranks`` is not
        modified; the caller records the assignments (and decides again, see the module
        docstring)."""
        window = list(requests[: self.max_window])
        if not window:
            return []
        if len(window) == 1 and self.window_s == 0:  # the fast path: one choose_rank
            rank = policy.choose_rank(window[0], ranks)
            return [None if rank is None else _checked(policy, rank, ranks.running, ranks.capacity)]
        answer = policy.choose_ranks(window, ranks)
        if len(answer) != len(window):
            raise PolicyContractError(
                f"policy {policy.name} answered {len(answer)} ranks for {len(window)} requests"
            )
        chosen: list[int | None] = []
        running = ranks.running.copy()
        for rank in answer:
            if rank is None and self.window_s == 0:
                break  # strict FIFO: nobody overtakes a head that waits
            if rank is not None:
                rank = _checked(policy, rank, running, ranks.capacity)
                running[rank] += 1
            chosen.append(rank)
        return chosen + [None] * (len(window) - len(chosen))


def _checked(policy: RoutingPolicy, rank: object, running: np.ndarray, capacity: int) -> int:
    """``rank`` as an int when it may take one more request given ``running``."""
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise PolicyContractError(f"policy {policy.name} answered a non-rank {rank!r}")
    r = int(rank)
    if not 0 <= r < running.size:
        raise PolicyContractError(
            f"policy {policy.name} broke its contract: rank {r} of {running.size}"
        )
    if running[r] >= capacity:
        raise PolicyContractError(
            f"policy {policy.name} broke its contract: rank {r} is full "
            f"({int(running[r])} of {capacity} running, counting this decision's)"
        )
    return r
