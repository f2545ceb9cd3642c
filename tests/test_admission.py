"""The shared admission routine (scheduler/policies/admission.py), and the simulator and
the server's dispatcher agreeing through it."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from scheduler.model_shape import ModelShape
from scheduler.policies import (
    Admission,
    PolicyContractError,
    RankState,
    RequestInfo,
    RoutingPolicy,
    TotalRequests,
    make_policy,
)
from scheduler.server.dispatcher import Dispatcher
from scheduler.simulation import SimulationConfig, Workload, load_workload, simulate
from scheduler.simulation.replay import arrival_times
from scheduler.traces.store import TraceSet
from tests.conftest import labelled_records, write_store
from tests.test_simulation import SHARES, TOPOLOGY, matching_placement


def req(rid: str) -> RequestInfo:
    return RequestInfo(rid)


def state(running: list[int], capacity: int = 1, gpus_per_node: int = 2) -> RankState:
    run = np.asarray(running, dtype=np.int64)
    return RankState(run, np.zeros_like(run), capacity, gpus_per_node)


class Recording(TotalRequests):
    """Least-loaded, refusing requests whose id starts with "x"; records every call."""

    name = "recording"

    def __init__(self) -> None:
        self.rank_calls: list[str] = []
        self.window_calls: list[list[str]] = []

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        self.rank_calls.append(request.request_id)
        if request.request_id.startswith("x"):
            return None
        return super().choose_rank(request, ranks)

    def choose_ranks(self, requests: Sequence[RequestInfo], ranks: RankState) -> list[int | None]:
        self.window_calls.append([r.request_id for r in requests])
        return super().choose_ranks(requests, ranks)


class Answers(RoutingPolicy):
    """Answers what it is told (to break the contract on purpose)."""

    name = "answers"

    def __init__(self, one: object = 0, many: list[object] | None = None) -> None:
        self.one, self.many = one, many

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        return self.one  # type: ignore[return-value]

    def choose_ranks(self, requests: Sequence[RequestInfo], ranks: RankState) -> list[int | None]:
        if self.many is None:
            return super().choose_ranks(requests, ranks)
        return list(self.many)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the routine


def test_parameters_are_checked() -> None:
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="window_s"):
            Admission(bad, 8)
    with pytest.raises(ValueError, match="max_window"):
        Admission(0.0, 0)
    assert Admission() == Admission(0.0, 256)


def test_due_times() -> None:
    fifo = Admission(0.0, 4)
    assert fifo.due(10.0, 1) == 10.0 and fifo.immediate(1)  # at once
    window = Admission(0.5, 4)
    assert window.due(10.0, 1) == 10.5 and window.due(10.0, 3) == 10.5
    assert window.due(10.0, 4) == 10.0 and window.due(10.0, 9) == 10.0  # a full window
    assert not window.immediate(3) and window.immediate(4)
    assert Admission(0.5, 1).immediate(1)


def test_fifo_stops_at_the_first_refused_head() -> None:
    policy = Recording()
    fifo = Admission(0.0, 8)
    ranks = state([0, 0, 0, 0])
    # the head is refused: nobody behind it overtakes (one joint call for the queue)
    assert fifo.decide(policy, [req("x0"), req("a"), req("b")], ranks) == [None] * 3
    assert policy.window_calls == [["x0", "a", "b"]]
    # a refused request further back stops the pass there
    got = fifo.decide(policy, [req("a"), req("b"), req("x1"), req("c")], ranks)
    assert got == [0, 1, None, None]
    # a single request is the fast path: choose_rank alone
    policy.rank_calls.clear()
    assert fifo.decide(policy, [req("d")], ranks) == [0]
    assert policy.rank_calls == ["d"] and len(policy.window_calls) == 2
    # each request sees the previous ones' assignments; a full cluster stops the pass
    assert fifo.decide(TotalRequests(), [req(f"r{i}") for i in range(6)], ranks) == [
        0,
        1,
        2,
        3,
        None,
        None,
    ]
    assert (ranks.running == 0).all()  # the caller's state is not modified


def test_window_goes_to_choose_ranks_jointly() -> None:
    policy = Recording()
    window = Admission(0.01, 8)
    got = window.decide(policy, [req("x0"), req("a"), req("b")], state([0, 0, 0, 0]))
    # one joint call; the default choose_ranks lets a later request pass a refused one
    assert policy.window_calls == [["x0", "a", "b"]]
    assert got == [None, 0, 1]


def test_max_window_cuts_the_decision() -> None:
    requests = [req(f"r{i}") for i in range(5)]
    policy = Recording()
    assert Admission(0.01, 3).decide(policy, requests, state([0, 0, 0, 0], capacity=9)) == [
        0,
        1,
        2,
    ]
    assert policy.window_calls == [["r0", "r1", "r2"]]
    policy = Recording()
    got = Admission(0.0, 3).decide(policy, requests, state([0, 0, 0, 0], capacity=9))
    assert got == [0, 1, 2] and policy.rank_calls == ["r0", "r1", "r2"]
    assert Admission(0.0, 3).decide(policy, [], state([0, 0])) == []


@pytest.mark.parametrize(
    ("admission", "policy", "message"),
    [
        (Admission(0.01, 8), Answers(many=[0]), "answered 1 ranks for 2 requests"),
        (Admission(0.01, 8), Answers(many=[0, 4]), "rank 4 of 4"),
        (Admission(0.01, 8), Answers(many=[-1, None]), "rank -1 of 4"),
        (Admission(0.01, 8), Answers(many=[1, 1]), "rank 1 is full"),
        (Admission(0.01, 8), Answers(many=[1.0, None]), "non-rank 1.0"),
        (Admission(0.01, 8), Answers(many=[True, None]), "non-rank True"),
        (Admission(0.0, 8), Answers(one=3), "rank 3 is full"),  # rank 3 is already full
        (Admission(0.0, 8), Answers(one=0), "rank 0 is full"),  # the second one overfills
        (Admission(0.01, 8), Answers(many=["0", None]), "non-rank '0'"),
    ],
)
def test_contract_violations_are_refused(
    admission: Admission, policy: RoutingPolicy, message: str
) -> None:
    with pytest.raises(PolicyContractError, match=message):
        admission.decide(policy, [req("a"), req("b")], state([0, 0, 0, 1]))


def test_numpy_ranks_are_accepted_as_ints() -> None:
    got = Admission(0.01, 8).decide(
        Answers(many=[np.int64(2), None]), [req("a"), req("b")], state([0, 0, 0, 0])
    )
    assert got == [2, None] and type(got[0]) is int


# ---------------------------------------------------------------------- the dispatcher


def make_dispatcher(
    policy: RoutingPolicy, capacity: int, window_s: float, max_window: int
) -> Dispatcher:
    return Dispatcher(
        policy,
        TOPOLOGY.num_gpus,
        TOPOLOGY.gpus_per_node,
        capacity,
        window_s=window_s,
        max_window=max_window,
        max_queue=10_000,
        cooldown_s=1.0,
    )


def test_try_acquire_is_the_decision_on_a_one_request_queue() -> None:
    async def go() -> None:
        d = make_dispatcher(Recording(), 1, 0.0, 8)
        assert [d.try_acquire(req(f"r{i}")) for i in range(5)] == [0, 1, 2, 3, None]
        assert d.try_acquire(req("x")) is None
        assert d.in_flight.tolist() == [1, 1, 1, 1]
        with pytest.raises(PolicyContractError, match="rank 7 of 4"):
            make_dispatcher(Answers(one=7), 1, 0.0, 8).try_acquire(req("a"))
        # with a window a request waits for it, unless a window of one is full at once
        assert make_dispatcher(Recording(), 1, 0.5, 8).try_acquire(req("a")) is None
        one = Recording()
        assert make_dispatcher(one, 1, 0.5, 1).try_acquire(req("a")) == 0
        assert one.window_calls == [["a"]]

    asyncio.run(go())


def test_dispatcher_decides_when_due_and_again_after_an_assignment() -> None:
    async def go() -> None:
        policy = Recording()
        d = make_dispatcher(policy, 9, 0.5, 2)
        d.start()
        try:
            waiters = [asyncio.ensure_future(d.acquire(req(f"r{i}"))) for i in range(5)]
            await asyncio.sleep(0.01)
            # all five queued at once: two full windows decided at once, then one more
            # decision only when the last has waited the window
            assert [w.done() for w in waiters] == [True] * 4 + [False]
            assert policy.window_calls == [["r0", "r1"], ["r2", "r3"]]
            assert await asyncio.wait_for(waiters[4], 5.0) == 0
            assert policy.window_calls[2:] == [["r4"]]
        finally:
            await d.stop()

    asyncio.run(go())


def test_dispatcher_at_window_0_lets_nobody_overtake_a_refused_head() -> None:
    async def go() -> None:
        policy = Recording()
        d = make_dispatcher(policy, 1, 0.0, 8)
        d.start()
        try:
            head = asyncio.ensure_future(d.acquire(req("x0")))
            behind = asyncio.ensure_future(d.acquire(req("a")))
            await asyncio.sleep(0.01)
            assert not head.done() and not behind.done() and d.queued == 2
            head.cancel()  # the head leaves: the next one is decided
            assert await asyncio.wait_for(behind, 5.0) == 0
        finally:
            await d.stop()

    asyncio.run(go())


# ---------------------------------------------------------------------- simulator = server


@pytest.fixture
def workload(tmp_path: Path, tiny_model: ModelShape) -> Workload:
    store = write_store(tmp_path / "store", tiny_model, labelled_records(tiny_model, 12))
    return load_workload(TraceSet(store))


def policy_factory(name: str, model: ModelShape) -> Callable[[], RoutingPolicy]:
    params: dict = {}
    if name == "class_affinity":
        params = {"class_to_node_share": SHARES}
    if name in ("locality_band", "locality_window"):
        params = {"placement": matching_placement(model)}
    return lambda: make_policy(name, **params)


def dispatcher_ranks(
    policy: RoutingPolicy,
    infos: list[RequestInfo],
    capacity: int,
    window_s: float,
    max_window: int,
) -> list[int | None]:
    """Ranks a Dispatcher gives ``infos`` acquired one after another (no releases)."""

    async def go() -> list[int | None]:
        d = make_dispatcher(policy, capacity, window_s, max_window)
        d.start()
        waiters: list[asyncio.Future[int]] = []
        try:
            for info in infos:
                waiters.append(asyncio.ensure_future(d.acquire(info)))
                await asyncio.sleep(0)  # enqueued in this order
            await asyncio.sleep(0.05)  # the decisions due now (the window is 60 s)
            return [w.result() if w.done() else None for w in waiters]
        finally:
            await d.stop()
            await asyncio.gather(*waiters, return_exceptions=True)

    return asyncio.run(go())


@pytest.mark.parametrize(
    "name", ["round_robin", "total_requests", "class_affinity", "locality_window"]
)
@pytest.mark.parametrize(
    ("window_ms", "max_window"),
    [(60_000.0, 24), (60_000.0, 5), (0.0, 256)],
    ids=["one-full-window", "windows-of-5", "fifo"],
)
@pytest.mark.parametrize("capacity", [8, 1], ids=["room-for-all", "room-for-4"])
def test_simulator_and_dispatcher_give_the_same_ranks(
    workload: Workload,
    tiny_model: ModelShape,
    name: str,
    window_ms: float,
    max_window: int,
    capacity: int,
) -> None:
    make = policy_factory(name, tiny_model)
    cfg = SimulationConfig(capacity=capacity, window_ms=window_ms, max_window=max_window)
    result = simulate(workload, make(), matching_placement(tiny_model), TOPOLOGY, tiny_model, cfg)
    _, _, order = arrival_times(workload, cfg)  # all 24 arrive at 0, in this order
    work = workload.select(order)
    infos = [
        RequestInfo(rid, label, hist, int(p))
        for rid, label, hist, p in zip(
            work.request_ids, work.labels, work.histogram, work.prefill, strict=True
        )
    ]
    # what the simulator decided at time 0, before any request finished
    at_zero = result.start_s[order] == 0.0
    simulated = [int(r) if z else None for r, z in zip(result.rank[order], at_zero, strict=True)]
    served = dispatcher_ranks(make(), infos, capacity, window_ms / 1e3, max_window)
    assert served == simulated
    expected = min(len(infos), capacity * TOPOLOGY.num_gpus)
    if max_window < len(infos) and window_ms:
        expected = min(expected, len(infos) // max_window * max_window)
    assert sum(r is not None for r in served) == expected


def test_simulator_never_decides_more_than_max_window(workload, tiny_model) -> None:
    policy = Recording()
    cfg = SimulationConfig(capacity=2, window_ms=0.01, max_window=5, rate=2000.0)
    result = simulate(workload, policy, matching_placement(tiny_model), TOPOLOGY, tiny_model, cfg)
    assert (result.finished == 1).all() and result.summary.max_window == 5
    assert policy.window_calls and max(len(w) for w in policy.window_calls) <= 5
    with pytest.raises(ValueError, match="max-window"):
        SimulationConfig(max_window=0)


def test_a_policy_that_breaks_its_contract_fails_its_window_not_the_dispatcher() -> None:
    class Broken(RoutingPolicy):
        name = "broken"

        def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
            return 99  # no such rank

    async def go() -> None:
        d = Dispatcher(Broken(), 4, 2, 2, window_s=0.01, max_window=8, max_queue=16, cooldown_s=1.0)
        d.start()
        try:
            with pytest.raises((PolicyContractError, IndexError)):  # the window fails
                await asyncio.wait_for(d.acquire(RequestInfo("a")), 5)
            d.replace_policy(make_policy("round_robin"), 2, 0.01, 8, 16, 1.0)
            assert await asyncio.wait_for(d.acquire(RequestInfo("b")), 5) in range(4)
        finally:
            await d.stop()

    asyncio.run(go())
