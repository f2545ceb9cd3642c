"""Per-DP-rank admission: a bounded running set, a FIFO queue, and a failure switch.

asyncio bookkeeping only (futures and events; no sockets, no sleeps). Each rank runs at
most ``capacity`` requests; more wait, first in first out, and none is dropped. A rank's
mode is ``ok``, ``fail`` or ``hang``:

* ``fail``: the rank is inactive. The load balancer skips it, as SGLang's DP controller
  skips inactive workers; a request *pinned* to it makes :meth:`RankPool.pick` raise
  :class:`ControllerCrash`, because SGLang's controller raises there and the whole server
  goes down (the HTTP layer then takes the instance down). Requests already queued or
  running on it when it fails get :class:`RankUnavailable` (the HTTP layer takes the
  instance down before they could be answered, see ``app``).
* ``hang``: nothing is admitted and running requests stop at their next checkpoint until
  the mode changes.

Also the per-rank figures SGLang's ``/v1/loads`` reports (:meth:`RankPool.loads`),
including the PD queues: decode requests waiting for their KV, prefill requests waiting
for their decode peer to fetch it.
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
#: Rank choice for requests without a pinned rank (SGLang's ``--load-balance-method``,
#: once ``auto`` is resolved: ``follow_bootstrap_room`` on a prefill instance).
LOAD_BALANCE_METHODS = ("round_robin", "total_requests", "follow_bootstrap_room")
#: Window of the generation-throughput figure in /v1/loads, seconds.
THROUGHPUT_WINDOW_S = 10


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class RankUnavailable(MoeSchedulerError):
    """The request's rank is failed, or the server is shutting down."""


class ControllerCrash(MoeSchedulerError):
    """Where SGLang's DP controller raises: the real server goes down (SIGQUIT) instead
    of answering. Raised for a request pinned to an inactive rank (``"DP rank R is not
    active."``), for an unpinned request when no rank is active, and under
    ``follow_bootstrap_room`` for a request without ``bootstrap_room`` (an assert there).
    ``restart_after_s``: what the failed rank's switch said about restarting (None: the
    instance stays down).
    """

    def __init__(self, message: str, restart_after_s: float | None = None) -> None:
        super().__init__(message)
        self.restart_after_s = restart_after_s


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
    #: For ``fail``: wall seconds after which an instance this rank took down restarts.
    restart_after_s: float | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    finished: int = 0
    #: Requests that found the rank full and had to wait (over-subscription).
    queued_total: int = 0
    generated: deque[list[int]] = field(default_factory=deque)  # [second, tokens]
    sleepers: set[asyncio.Future[bool]] = field(default_factory=set)
    #: PD decode: requests (and their prompt tokens) picked for the rank whose KV has not
    #: arrived yet (SGLang's prealloc and transfer queues).
    awaiting_kv: int = 0
    awaiting_kv_tokens: int = 0
    #: PD prefill: requests whose prefill is done, waiting for the decode peer to fetch
    #: the KV (SGLang's inflight queue).
    kv_inflight: int = 0
    #: SGLang's cumulative prefill counters (uncached prompt tokens, busy microseconds;
    #: modelled time).
    prefill_tokens: int = 0
    prefill_busy_us: float = 0.0
    #: SGLang's decode-step moment sums: steps, sum b, sum t_us, sum b^2, sum b t_us,
    #: sum generated (b: batch size, t_us: step time; modelled time).
    decode_moments: list[float] = field(default_factory=lambda: [0.0] * 6)


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

    def pick(self, requested: int | None, bootstrap_room: int | None = None) -> int:
        """The rank for a request: ``requested`` if given, else by the load balance method
        among ranks not in ``fail`` mode (SGLang's round robin skips inactive ranks), or
        ``bootstrap_room % ranks`` under ``follow_bootstrap_room``.

        Raises ValueError for a rank out of range (SGLang's tokenizer answers it 400), and
        ControllerCrash where SGLang's DP controller raises (the class doc)."""
        n = len(self.ranks)
        if requested is not None:
            if not 0 <= requested < n:
                raise ValueError(f"routed_dp_rank={requested} out of range [0, {n})")
            rank = self.ranks[requested]
            if rank.mode == "fail":
                raise ControllerCrash(f"DP rank {requested} is not active.", rank.restart_after_s)
            return requested
        if self.load_balance == "follow_bootstrap_room":
            if bootstrap_room is None:
                raise ControllerCrash(
                    "req.bootstrap_room should not be None. Do not send requests directly "
                    "to prefill or decode instances; send to the router instead."
                )
            target = self.ranks[bootstrap_room % n]
            if target.mode == "fail":  # a dead GPU: the instance ends
                raise ControllerCrash(
                    f"DP rank {target.index} is not active.", target.restart_after_s
                )
            return target.index
        alive = [r for r in self.ranks if r.mode != "fail"]
        if not alive:
            raise ControllerCrash("No active DP workers are available for routing.")
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

    # ----------------------------------------------------------------- PD and step counters

    def expect_kv(self, index: int, tokens: int, *, arrived: bool = False) -> None:
        """A decode request on rank ``index`` waits for (``arrived``: has got) its KV."""
        rank = self.ranks[index]
        sign = -1 if arrived else 1
        rank.awaiting_kv += sign
        rank.awaiting_kv_tokens += sign * tokens

    def kv_in_flight(self, index: int, delta: int) -> None:
        """A prefill request on rank ``index`` starts (+1) or stops (-1) waiting for its
        decode peer to fetch the KV."""
        self.ranks[index].kv_inflight += delta

    def record_prefill(self, index: int, tokens: int, modelled_s: float) -> None:
        """A prefill pass of ``tokens`` prompt tokens lasting ``modelled_s`` ran on ``index``."""
        rank = self.ranks[index]
        rank.prefill_tokens += tokens
        rank.prefill_busy_us += modelled_s * 1e6

    def record_decode(self, index: int, tokens: int, batch: int, step_s: float) -> None:
        """A request generated ``tokens`` decode tokens in steps of ``step_s`` (modelled)
        with ``batch`` requests running: ``tokens / batch`` of the rank's steps, in SGLang's
        moment sums (``_accumulate_decode_moment``)."""
        if tokens <= 0 or batch <= 0 or step_s <= 0:
            return
        steps, t_us = tokens / batch, step_s * 1e6
        for i, value in enumerate(
            (steps, tokens, steps * t_us, batch * tokens, tokens * t_us, tokens)
        ):
            self.ranks[index].decode_moments[i] += value

    def running_count(self, index: int) -> int:
        """Requests running on rank ``index`` (a request itself included once admitted)."""
        return self.ranks[index].batch_requests

    # ----------------------------------------------------------------- failure switch

    def busy(self, index: int) -> bool:
        """Whether rank ``index`` has requests running, queued or waiting for KV."""
        rank = self.ranks[index]
        return bool(rank.running or rank.waiting or rank.awaiting_kv or rank.kv_inflight)

    def validate_mode(self, index: int, mode: str) -> None:
        """ValueError naming the problem unless ``mode`` can be set on rank ``index``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 <= index < len(self.ranks):
            raise ValueError(f"DP rank {index} is out of range [0, {len(self.ranks)})")

    def set_mode(self, index: int, mode: str, restart_after_s: float | None = None) -> None:
        """Switch rank ``index`` to ``mode``; for ``fail``, ``restart_after_s`` is kept for
        the instance death a request pinned to it causes."""
        self.validate_mode(index, mode)
        rank = self.ranks[index]
        rank.mode = mode
        rank.restart_after_s = restart_after_s if mode == "fail" else None
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

    def loads(
        self, include: set[str] | None = None, disaggregation_mode: str = "null"
    ) -> list[dict[str, Any]]:
        """Per-rank load in the shape of SGLang 0.5.23's ``/v1/loads`` entries
        (``LoadSnapshot.to_dict``): the core fields always, then the sections asked for
        (None or ``all``: every one the emulator has, ``disaggregation`` and ``queues``; it
        has no ``memory``, ``speculative`` or ``lora``), then an ``emulator`` block.

        The KV cache is not modelled: token capacity and usage report 0 and nothing is
        ever preallocated (``prealloc_ready`` 0).
        """
        now = self.clock()
        sections = include or {"all"}
        everything = "all" in sections
        decode = disaggregation_mode == "decode"
        prefill = disaggregation_mode == "prefill"
        out = []
        for r in self.ranks:
            recent = sum(t for s, t in r.generated if s >= now - THROUGHPUT_WINDOW_S)
            total = r.used_tokens + r.waiting_tokens + r.awaiting_kv_tokens
            entry: dict[str, Any] = {
                "timestamp": time.time(),
                "dp_rank": r.index,
                "num_running_reqs": r.running,
                "num_waiting_reqs": len(r.waiting) + r.awaiting_kv,
                "num_waiting_uncached_tokens": r.waiting_tokens,
                "num_used_tokens": r.used_tokens,
                "num_total_tokens": total,
                "num_active_tokens": total - r.awaiting_kv_tokens,
                "num_prealloc_ready_tokens": 0,
                "max_total_num_tokens": 0,
                "max_running_requests": r.capacity,
                "token_usage": 0.0,
                "gen_throughput": recent / THROUGHPUT_WINDOW_S,
                "cache_hit_rate": 0.0,
                "utilization": r.running / r.capacity,
                "total_prefill_uncached_tokens": r.prefill_tokens,
                "total_prefill_busy_us": int(r.prefill_busy_us),
                "decode_moments": list(r.decode_moments) if r.decode_moments[0] > 0 else None,
            }
            if everything or "disagg" in sections:
                entry["disaggregation"] = {
                    "mode": disaggregation_mode,
                    "prefill_bootstrap_queue_reqs": 0,
                    "prefill_inflight_queue_reqs": r.kv_inflight if prefill else 0,
                    "decode_prealloc_queue_reqs": r.awaiting_kv if decode else 0,
                    "decode_transfer_queue_reqs": 0,
                    "decode_retracted_queue_reqs": 0,
                    "kv_transfer_speed_gb_s": 0.0,
                    "kv_transfer_latency_ms": 0.0,
                }
            if everything or "queues" in sections:
                entry["queues"] = {
                    "waiting": len(r.waiting),
                    "grammar": 0,
                    "paused": len(r.waiting) if r.mode == "hang" else 0,
                    "retracted": 0,
                    "prealloc_ready": 0,
                }
            entry["emulator"] = {
                "mode": r.mode,
                "finished_reqs": r.finished,
                "queued_reqs_total": r.queued_total,
            }
            out.append(entry)
        return out
