"""Admission and rank assignment: a bounded queue, scheduling windows, per-rank slots.

Every request holds one slot of its rank from assignment to :meth:`Dispatcher.release`;
a rank never has more than its share of the capacity in flight (``capacity // replicas``
when several scheduler replicas share the cluster). Failed ranks are taken out for a
cool-down and tried again after it; a rank SGLang reports as queueing (``/v1/loads``
``num_waiting_reqs > 0``: someone is oversubscribing it) takes no new requests.

Admission is deadline-aware: a request whose remaining deadline cannot cover its
expected wait for a slot plus the time it needs once dispatched (``need_s``: time to
first token for a stream, to the answer for a unary call) is refused at once
(:class:`DeadlineRefused`), and again at dispatch if its deadline ran short while it
waited. Under overload the slots then go to requests that can still finish, instead of
to requests that time out at the backend. The expected wait comes from the measured
slot hold time (:class:`ServiceTimes`).

When queued requests are decided, and how, is the shared admission routine
(:class:`scheduler.policies.Admission`, also the simulator's): a decision is due when the
oldest queued request has waited ``window_s`` or ``max_window`` are queued (at once with
``window_s = 0``); with ``window_s = 0`` the queue is decided head first, one request at a
time, until the policy answers None (strict FIFO), otherwise the first ``max_window``
go to the policy's ``choose_ranks`` together. After a decision that assigned someone, the
loop decides again as soon as the rest is due. :meth:`Dispatcher.try_acquire` is the same
decision on a one-request queue, taken without queueing when nobody waits and such a
queue is due at once. What stays here is the asynchronous part: futures, deadlines,
cancellation, failed ranks, ranks of instances that are down, and SGLang's queueing
ranks (all look full to the policy). One dispatcher serves one pool (the instances of
one role, ``cluster.Pool``); its rank numbers are the pool's.

Runs on one asyncio loop; the policy is called only from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from scheduler.errors import DeadlineRefused, Overloaded
from scheduler.policies import Admission, RankState, RequestInfo, RoutingPolicy


class ServiceTimes:
    """Exponentially weighted means of what requests took, for admission estimates."""

    ALPHA = 0.05

    def __init__(self) -> None:
        self.hold_s = 0.0  # a rank slot, acquire to release
        self.ttft_s = 0.0  # dispatch to first token (a unary answer counts as its first)
        self.per_token_s = 0.0  # each further generated token
        self.completion_ratio = 1.0  # completion tokens / max_new_tokens

    def observe(self, hold_s: float, ttft_s: float, tokens: int, max_new_tokens: int) -> None:
        a = self.ALPHA if self.hold_s else 1.0
        self.hold_s += a * (hold_s - self.hold_s)
        self.ttft_s += a * (ttft_s - self.ttft_s)
        if tokens > 1:
            self.per_token_s += a * ((hold_s - ttft_s) / (tokens - 1) - self.per_token_s)
        if max_new_tokens > 0:
            self.completion_ratio += a * (min(1.0, tokens / max_new_tokens) - self.completion_ratio)

    def need_s(self, stream: bool, max_new_tokens: int) -> float:
        """Expected seconds from dispatch to what the client waits for."""
        if stream:
            return self.ttft_s
        return self.ttft_s + self.per_token_s * max_new_tokens * self.completion_ratio


@dataclass
class _Ticket:
    info: RequestInfo
    enqueued: float
    future: asyncio.Future[int] = field(repr=False)
    deadline: float | None = None
    need_s: float = 0.0


class Dispatcher:
    def __init__(
        self,
        policy: RoutingPolicy,
        num_ranks: int,
        gpus_per_node: int,
        capacity: int,
        *,
        window_s: float,
        max_window: int,
        max_queue: int,
        cooldown_s: float,
    ) -> None:
        self.gpus_per_node = gpus_per_node
        self._wake = asyncio.Event()
        self.replace_policy(policy, capacity, window_s, max_window, max_queue, cooldown_s)
        self.in_flight = np.zeros(num_ranks, dtype=np.int64)
        self.dispatched = np.zeros(num_ranks, dtype=np.int64)
        self.failed_until = np.zeros(num_ranks)  # monotonic time a failed rank returns
        self.out_until = np.zeros(num_ranks)  # ... and a rank of an instance that is down
        self.backend_running = np.zeros(num_ranks, dtype=np.int64)
        self.backend_waiting = np.zeros(num_ranks, dtype=np.int64)
        self.reroutes = 0
        self.times = ServiceTimes()
        self._queue: deque[_Ticket] = deque()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ state

    @property
    def num_ranks(self) -> int:
        return int(self.in_flight.size)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def window_s(self) -> float:
        return self.admission.window_s

    @property
    def max_window(self) -> int:
        return self.admission.max_window

    def healthy(self, now: float | None = None) -> np.ndarray:
        now = time.monotonic() if now is None else now
        return (self.failed_until <= now) & (self.out_until <= now)

    def _back_at(self) -> float:
        """Monotonic time the first rank that is out comes back."""
        return float(np.maximum(self.failed_until, self.out_until).min())

    def rank_state(self) -> RankState:
        """What the policy sees: ranks out of service or queueing at SGLang look full."""
        blocked = ~self.healthy() | (self.backend_waiting > 0)
        running = np.where(blocked, np.maximum(self.in_flight, self.capacity), self.in_flight)
        return RankState(running, np.zeros_like(running), self.capacity, self.gpus_per_node)

    def mark_failed(self, rank: int) -> None:
        self.failed_until[rank] = time.monotonic() + self.cooldown_s
        self._wake.set()

    def mark_out(self, ranks: range, seconds: float) -> None:
        """The ranks of an instance that is down (or just failed a request) take nothing
        for ``seconds``; :meth:`mark_back` ends that early (its health came back)."""
        self.out_until[ranks.start : ranks.stop] = time.monotonic() + seconds
        self._wake.set()

    def mark_back(self, ranks: range) -> None:
        self.out_until[ranks.start : ranks.stop] = 0.0
        self._wake.set()

    def update_backend_loads(
        self, running: np.ndarray, waiting: np.ndarray, start: int = 0
    ) -> None:
        """SGLang's own counts (``/v1/loads``) of ranks ``start, start + 1, ...``."""
        self.backend_running[start : start + running.size] = running
        self.backend_waiting[start : start + waiting.size] = waiting
        self._wake.set()

    def replace_policy(
        self,
        policy: RoutingPolicy,
        capacity: int,
        window_s: float,
        max_window: int,
        max_queue: int,
        cooldown_s: float,
    ) -> None:
        """Set the policy and its parameters (at start and on reload, same cluster shape);
        slots in flight stay counted."""
        self.policy = policy
        self.admission = Admission(window_s, max_window)
        self.capacity = capacity
        self.max_queue, self.cooldown_s = max_queue, cooldown_s
        self._wake.set()

    # ------------------------------------------------------------------ requests

    def expected_wait(self) -> float:
        """Seconds a request arriving now should wait for a slot."""
        slots = int(self.healthy().sum()) * self.capacity
        if slots == 0:
            return self._back_at() - time.monotonic()
        free = slots - int(self.in_flight.sum())
        ahead = len(self._queue) + 1 - max(free, 0)
        return max(0, ahead) * self.times.hold_s / slots + self.window_s

    def try_acquire(self, info: RequestInfo) -> int | None:
        """A rank slot at once, or None: when nobody is queued and a one-request queue is
        due at once (window 0), the admission's decision on that queue."""
        if self._queue or not self.admission.immediate(1):
            return None
        rank = self.admission.decide(self.policy, [info], self.rank_state())[0]
        if rank is not None:
            self._take(rank)
        return rank

    async def acquire(
        self, info: RequestInfo, deadline: float | None = None, need_s: float = 0.0
    ) -> int:
        """A rank slot for ``info``: immediately when the window is 0 and a rank is free,
        else when the admission next decides it. Raises :class:`Overloaded` when the
        queue is full and :class:`DeadlineRefused` when ``deadline`` (monotonic) cannot
        cover the expected wait plus ``need_s``. A cancelled waiter leaves the queue, or
        gives back the slot it was just given."""
        rank = self.try_acquire(info)
        if rank is not None:
            return rank
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests queued (server.max_queue)")
        now = time.monotonic()
        if deadline is not None:
            wait = self.expected_wait()
            if deadline - now < wait + need_s:
                raise DeadlineRefused(
                    f"the deadline ({max(0.0, deadline - now):.3g} s left) cannot cover the "
                    f"expected wait of {wait:.3g} s plus {need_s:.3g} s of service"
                )
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Ticket(info, now, future, deadline, need_s))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result(), info)
            else:
                future.cancel()
                self._wake.set()  # it may have been the head that held the others back
            raise

    def release(self, rank: int, info: RequestInfo) -> None:
        """``info`` no longer runs on ``rank``."""
        self.in_flight[rank] -= 1
        if self.in_flight[rank] < 0:
            raise AssertionError(f"rank {rank} released more often than taken")
        self.policy.on_finish(info, rank)
        if self._queue:
            self._wake.set()

    def _take(self, rank: int) -> None:
        """Record an assignment (the admission checked it against :meth:`rank_state`)."""
        self.in_flight[rank] += 1
        self.dispatched[rank] += 1

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dispatcher")

    def fail_queued(self, error: Exception) -> int:
        """End every queued request with ``error`` (its pool is gone); how many."""
        failed = 0
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.future.done():
                ticket.future.set_exception(error)
                failed += 1
        return failed

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.future.done():
                ticket.future.set_exception(Overloaded("the server is shutting down"))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drop_cancelled()
            if not await self._until_due():
                continue
            self._decide()
            if self._queue and not self.healthy().any():
                # Every rank is out: wake when the first cool-down ends.
                await asyncio.sleep(max(0.0, self._back_at() - time.monotonic()))
                self._wake.set()

    def _due_in(self) -> float:
        """Seconds until the admission's next decision is due (<= 0: now); queue not empty."""
        due = self.admission.due(self._queue[0].enqueued, len(self._queue))
        return due - time.monotonic()

    async def _until_due(self) -> bool:
        """Wait until a decision is due (the oldest request has waited the window, or the
        window is full; re-checked on every wake); False when the queue emptied."""
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # cancelled at the head: the next one is the oldest
            if not self._queue:
                return False
            delay = self._due_in()
            if delay <= 0:
                return True
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _drop_cancelled(self) -> None:
        if any(t.future.done() for t in self._queue):
            self._queue = deque(t for t in self._queue if not t.future.done())

    def _refuse_late(self) -> None:
        """Refuse queued requests whose deadline no longer covers their service."""
        now = time.monotonic()
        late = [
            t
            for t in self._queue
            if t.deadline is not None and t.deadline - now < t.need_s and not t.future.done()
        ]
        for t in late:
            left = max(0.0, (t.deadline or now) - now)
            t.future.set_exception(
                DeadlineRefused(
                    f"queued {now - t.enqueued:.3g} s; the {left:.3g} s left cannot cover "
                    f"{t.need_s:.3g} s of service"
                )
            )

    def _decide(self) -> None:
        """One admission decision over the queue (which is due)."""
        self._refuse_late()
        self._drop_cancelled()
        if not self._queue:
            return
        if self._due_in() > 0:
            self._wake.set()  # the refused were the oldest: wait for the rest to be due
            return
        window = list(itertools.islice(self._queue, self.admission.max_window))
        try:
            ranks = self.admission.decide(self.policy, [t.info for t in window], self.rank_state())
        except Exception as e:  # a broken policy: fail this window, keep the loop alive
            for ticket in window:
                if not ticket.future.done():
                    ticket.future.set_exception(e)
            self._drop_cancelled()
            if self._queue:
                self._wake.set()
            return
        assigned = set()
        for ticket, rank in zip(window, ranks, strict=True):
            if rank is None:
                continue
            self._take(rank)
            ticket.future.set_result(rank)
            assigned.add(id(ticket))
        if assigned:
            self._queue = deque(t for t in self._queue if id(t) not in assigned)
            if self._queue:
                self._wake.set()  # the rest of the queue: decided again once it is due
