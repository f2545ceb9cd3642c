"""The routing-policy interface: which DP rank serves a request.

Pure: no network code, no environment, no file I/O. The simulator and the gRPC server
call the same policies; only the clock and the backend differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about a request when it is routed.

    ``predicted_class``: the request's class (a key of the plan's ``class_to_node_share``),
    or None when unknown. ``expert_histogram``: predicted ``[moe_layers, experts]`` counts
    of (token, expert) pairs, or None. ``prompt_tokens``: the prompt's length.
    """

    request_id: str
    predicted_class: str | None = None
    expert_histogram: np.ndarray | None = None
    prompt_tokens: int = 0


@dataclass(frozen=True)
class RankState:
    """Load of every DP rank when a request is routed.

    ``running [ranks]``: requests running on each rank; ``queued [ranks]``: requests
    waiting on each rank (0 where the router keeps one global queue); ``capacity``: max
    running requests per rank; ``gpus_per_node``: G (rank r sits on node r // G).
    """

    running: np.ndarray
    queued: np.ndarray
    capacity: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.running.shape != self.queued.shape or self.running.ndim != 1:
            raise ValueError("running and queued must both be [ranks]")
        if self.capacity < 1 or self.gpus_per_node < 1:
            raise ValueError("capacity and gpus_per_node must be >= 1")
        if self.running.size % self.gpus_per_node:
            raise ValueError(f"{self.running.size} ranks is not a multiple of G")

    @property
    def num_ranks(self) -> int:
        return int(self.running.size)

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.gpus_per_node

    def free(self) -> np.ndarray:
        """[ranks] bool: the rank can take one more running request."""
        return np.asarray(self.running < self.capacity)

    def load(self) -> np.ndarray:
        """[ranks] running + queued requests (SGLang's ``total_requests``)."""
        return np.asarray(self.running + self.queued)

    def least_loaded(self, candidates: np.ndarray | None = None) -> int | None:
        """The free rank with the smallest load among ``candidates [ranks] bool`` (all
        ranks when None), lowest index on ties; None when none is free."""
        ok = self.free() if candidates is None else self.free() & candidates
        if not ok.any():
            return None
        load = np.where(ok, self.load(), np.iinfo(np.int64).max)
        return int(np.argmin(load))


class RoutingPolicy(ABC):
    """Chooses the DP rank of each request.

    Contract:

    * :meth:`choose_rank` returns a rank ``r`` with ``ranks.running[r] < ranks.capacity``,
      or None when no rank may take the request now (the caller keeps it queued and asks
      again later). It must not mutate ``ranks``; the caller records the assignment.
    * The answer depends only on the policy's parameters, its own state (updated by
      :meth:`choose_rank` and :meth:`on_finish`) and the arguments: no clock, no random
      source, so two policies built alike and fed the same calls answer alike.
    * :meth:`on_finish` is called once per request that finished on ``rank``.
    """

    #: The registry name.
    name: str = ""

    @abstractmethod
    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        """The rank to run ``request`` on, or None to keep it queued."""

    def choose_ranks(self, requests: Sequence[RequestInfo], ranks: RankState) -> list[int | None]:
        """Ranks for one scheduling window of queued ``requests`` (oldest first), one
        entry per request, None for those that stay queued; together they must not take
        any rank past ``ranks.capacity``.

        The default asks :meth:`choose_rank` one request at a time, each seeing the
        previous ones' assignments; window policies override it to assign jointly.
        """
        running = ranks.running.copy()
        chosen: list[int | None] = []
        for request in requests:
            rank = self.choose_rank(request, replace(ranks, running=running.copy()))
            chosen.append(rank)
            if rank is not None:
                running[rank] += 1
        return chosen

    def on_finish(self, request: RequestInfo, rank: int) -> None:  # noqa: B027
        """``request`` finished on ``rank`` (default: nothing to update)."""
