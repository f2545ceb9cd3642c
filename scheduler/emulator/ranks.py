"""Per-DP-rank admission: a bounded running set, a FIFO queue, and a failure switch.

asyncio bookkeeping only (futures and events; no sockets, no sleeps). Each rank runs at
most ``capacity`` requests; more wait, first in first out, and none is dropped. A rank's
mode is ``ok``, ``fail`` (requests routed to it are refused with :class:`RankUnavailable`,
running ones fail at their next checkpoint, as if the rank had died) or ``hang`` (nothing
is admitted and running requests stop at their next checkpoint until the mode changes).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.emulator.timing import TokenTraffic
from scheduler.errors import MoeSchedulerError

MODES = ("ok", "fail", "hang")
LOAD_BALANCE_METHODS = ("round_robin", "total_requests")
#: Window of the generation-throughput figure in /v1/loads, seconds.
THROUGHPUT_WINDOW_S = 10


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class RankUnavailable(MoeSchedulerError):
    """The request's rank is failed, or the server is shutting down."""


@dataclass
class Ticket:
    """One request's claim on a rank."""

    prompt_tokens: int
    total_tokens: int  # prompt + completion, held in the running set
    #: The request's expected traffic per decode token (timing.TokenTraffic); a rank's
    #: decode step is timed from the sum over its running requests.
    traffic: TokenTraffic = field(default_factory=TokenTraffic)


@dataclass
class _Rank:
    index: int
    capacity: int
    running: int = 0
    used_tokens: int = 0
    batch: TokenTraffic = field(default_factory=TokenTraffic)
    batch_requests: int = 0  # requests whose traffic is in ``batch``
    waiting: deque[tuple[asyncio.Future[None], Ticket]] = field(default_factory=deque)
    waiting_tokens: int = 0
    mode: str = "ok"
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    finished: int = 0
    #: Requests that found the rank full and had to wait (over-subscription).
    queued_total: int = 0
    generated: deque[list[int]] = field(default_factory=deque)  # [second, tokens]
    sleepers: set[asyncio.Future[bool]] = field(default_factory=set)


class RankPool:
    """The emulated cluster's DP ranks. Create it inside the running event loop."""

    def __init__(
        self,
        num_ranks: int,
        capacity: int,
        *,
        load_balance: str = "round_robin",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if load_balance not in LOAD_BALANCE_METHODS:
            raise ValueError(
                f"load balance method must be one of {', '.join(LOAD_BALANCE_METHODS)}, "
                f"got {load_balance!r}"
            )
        self.capacity = capacity
        self.load_balance = load_balance
        self.clock = clock
        self.ranks = [_Rank(i, capacity) for i in range(num_ranks)]
        for r in self.ranks:
            r.resume.set()
        self.closing = False
        self._next = 0

    def __len__(self) -> int:
        return len(self.ranks)

    # ----------------------------------------------------------------- choosing a rank

    def pick(self, requested: int | None) -> int:
        """The rank for a request: ``requested`` if given (validated), else by the load
        balance method among ranks not in ``fail`` mode (SGLang's round robin skips dead
        ranks). Raises ValueError for a rank out of range, RankUnavailable if none is up."""
        n = len(self.ranks)
        if requested is not None:
            if not 0 <= requested < n:
                raise ValueError(f"routed_dp_rank {requested} is out of range [0, {n})")
            return requested
        alive = [r for r in self.ranks if r.mode != "fail"]
        if not alive:
            raise RankUnavailable("no DP rank is active")
        if self.load_balance == "total_requests":
            return min(alive, key=lambda r: (r.running + len(r.waiting), r.index)).index
        for _ in range(n):
            rank = self.ranks[self._next % n]
            self._next += 1
            if rank.mode != "fail":
                return rank.index
        raise AssertionError("unreachable: some rank is alive")

    # ----------------------------------------------------------------- admission

    def _check(self, rank: _Rank) -> None:
        if self.closing:
            raise RankUnavailable("the server is shutting down")
        if rank.mode == "fail":
            raise RankUnavailable(f"DP rank {rank.index} is not active.")

    async def admit(self, index: int, ticket: Ticket) -> None:
        """Wait (FIFO) for a running slot on rank ``index``; the caller must then
        :meth:`release` it. Raises RankUnavailable if the rank fails meanwhile."""
        rank = self.ranks[index]
        self._check(rank)
        if rank.running >= rank.capacity or rank.waiting or rank.mode == "hang":
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (future, ticket)
            rank.waiting.append(entry)
            rank.queued_total += 1
            rank.waiting_tokens += ticket.prompt_tokens
            try:
                await future  # resolved by _hand_over, which counts us as running
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._free_slot(rank)  # a slot was handed to us: give it on
                else:
                    rank.waiting.remove(entry)
                raise
            finally:
                rank.waiting_tokens -= ticket.prompt_tokens
        else:
            rank.running += 1
        try:
            self._check(rank)  # it may have failed while the slot was on its way
        except RankUnavailable:
            self._free_slot(rank)
            raise
        rank.used_tokens += ticket.total_tokens
        rank.batch += ticket.traffic
        rank.batch_requests += 1

    def release(self, index: int, ticket: Ticket, generated_tokens: int) -> None:
        """Free the slot taken by :meth:`admit`."""
        rank = self.ranks[index]
        rank.used_tokens -= ticket.total_tokens
        rank.batch_requests -= 1
        # an empty batch restarts from exact zeros (no rounding left by + and -)
        rank.batch = rank.batch - ticket.traffic if rank.batch_requests else TokenTraffic()
        rank.finished += 1
        if generated_tokens:
            second = int(self.clock())
            if rank.generated and rank.generated[-1][0] == second:
                rank.generated[-1][1] += generated_tokens
            else:
                rank.generated.append([second, generated_tokens])
                while rank.generated and rank.generated[0][0] < second - THROUGHPUT_WINDOW_S:
                    rank.generated.popleft()
        self._free_slot(rank)

    def _free_slot(self, rank: _Rank) -> None:
        """Hand a freed slot to the first waiter, or return it."""
        if rank.mode == "ok" and not self.closing:
            while rank.waiting:
                future, _ = rank.waiting.popleft()
                if not future.done():
                    future.set_result(None)
                    return
        rank.running -= 1

    def _hand_over_free_slots(self, rank: _Rank) -> None:
        while rank.waiting and rank.running < rank.capacity:
            future, _ = rank.waiting.popleft()
            if not future.done():
                rank.running += 1
                future.set_result(None)

    async def checkpoint(self, index: int) -> None:
        """Called by running requests between steps: blocks while the rank hangs; raises
        RankUnavailable if it failed, or if it hangs when the server shuts down (running
        requests on healthy ranks are left to finish)."""
        rank = self.ranks[index]
        if rank.mode == "hang" and not self.closing:
            await rank.resume.wait()
        if rank.mode == "fail":
            raise RankUnavailable(f"DP rank {index} is not active.")
        if rank.mode == "hang":  # released by shutdown
            raise RankUnavailable("the server is shutting down")

    async def wait(self, index: int, seconds: float) -> bool:
        """Sleep ``seconds`` for a request running on rank ``index``; True if woken early
        by :meth:`wake` (a mode change, a new time scale, shutdown)."""
        rank = self.ranks[index]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, future, False)
        rank.sleepers.add(future)
        try:
            return await future
        finally:
            handle.cancel()
            rank.sleepers.discard(future)

    def wake(self, index: int | None = None) -> None:
        """End the :meth:`wait` of every request on rank ``index`` (all ranks if None)."""
        for rank in self.ranks if index is None else [self.ranks[index]]:
            for future in rank.sleepers:
                _resolve(future, True)

    # ----------------------------------------------------------------- failure switch

    def set_mode(self, index: int, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 <= index < len(self.ranks):
            raise ValueError(f"DP rank {index} is out of range [0, {len(self.ranks)})")
        rank = self.ranks[index]
        rank.mode = mode
        self.wake(index)
        if mode == "hang":
            rank.resume.clear()
            return
        rank.resume.set()
        if mode == "fail":
            self._fail_waiters(rank, f"DP rank {index} is not active.")
        else:
            self._hand_over_free_slots(rank)

    def _fail_waiters(self, rank: _Rank, message: str) -> None:
        while rank.waiting:
            future, _ = rank.waiting.popleft()
            if not future.done():
                future.set_exception(RankUnavailable(message))

    def close(self) -> None:
        """Shutting down: refuse new requests, fail waiters, release hung requests."""
        self.closing = True
        for rank in self.ranks:
            self._fail_waiters(rank, "the server is shutting down")
            rank.resume.set()
        self.wake()

    # ----------------------------------------------------------------- reporting

    def modes(self) -> list[str]:
        return [r.mode for r in self.ranks]

    def batch_traffic(self, index: int) -> TokenTraffic:
        """The summed per-token traffic of rank ``index``'s running requests."""
        return self.ranks[index].batch

    def loads(self, include: set[str] | None = None) -> list[dict[str, Any]]:
        """Per-rank load in the shape of SGLang's ``/v1/loads`` entries.

        ``include``: sections ``core`` and ``queues`` (None or ``all``: both). The KV cache
        is not modelled: its fields report 0.
        """
        now = self.clock()
        sections = include or {"all"}
        everything = "all" in sections
        out = []
        for r in self.ranks:
            entry: dict[str, Any] = {"dp_rank": r.index, "timestamp": time.time()}
            if everything or "core" in sections:
                recent = sum(t for s, t in r.generated if s >= now - THROUGHPUT_WINDOW_S)
                entry.update(
                    num_running_reqs=r.running,
                    num_waiting_reqs=len(r.waiting),
                    num_used_tokens=r.used_tokens,
                    num_total_tokens=r.used_tokens + r.waiting_tokens,
                    max_total_num_tokens=0,
                    token_usage=0.0,
                    gen_throughput=recent / THROUGHPUT_WINDOW_S,
                    cache_hit_rate=0.0,
                    utilization=r.running / r.capacity,
                    max_running_requests=r.capacity,
                )
            if everything or "queues" in sections:
                entry["queues"] = {
                    "waiting": len(r.waiting),
                    "grammar": 0,
                    "paused": len(r.waiting) if r.mode == "hang" else 0,
                    "retracted": 0,
                }
            entry["emulator"] = {
                "mode": r.mode,
                "finished_reqs": r.finished,
                "queued_reqs_total": r.queued_total,
            }
            out.append(entry)
        return out
