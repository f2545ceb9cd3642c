"""RankPool: bounded running sets, FIFO queues, failure modes (in-process asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.emulator.ranks import ControllerCrash, RankPool, RankUnavailable, Ticket
from scheduler.emulator.timing import TokenTraffic
from tests.conftest import WAIT_TIMEOUT_S, wait_until_async

T = Ticket(prompt_tokens=10, total_tokens=14, traffic=TokenTraffic(0.3, 0.1, 6.0))


async def _queued(pool: RankPool, rank: int, count: int) -> None:
    """Until ``count`` requests wait in rank ``rank``'s admission queue. Tasks start in
    creation order, so by then every task created before the last of them has reached
    its first wait too (e.g. a :meth:`RankPool.checkpoint` blocked on a hung rank)."""
    await wait_until_async(
        lambda: pool.loads()[rank]["queues"]["waiting"] == count,
        what=lambda: f"{count} queued on rank {rank}; loads {pool.loads()[rank]}",
    )


def test_admission_is_fifo_within_capacity():
    async def main() -> None:
        pool = RankPool(2, capacity=1)
        order: list[str] = []

        async def request(name: str) -> None:
            await pool.admit(0, T)
            order.append(name)

        await pool.admit(0, T)  # "a" holds the only slot
        tasks = [asyncio.create_task(request(n)) for n in "bcd"]
        await _queued(pool, 0, 3)
        load = pool.loads()[0]
        assert (load["num_running_reqs"], load["num_waiting_reqs"]) == (1, 3)
        assert load["num_total_tokens"] == 14 + 3 * 10 and load["num_used_tokens"] == 14
        for done, expected in enumerate("bcd", start=1):
            pool.release(0, T, generated_tokens=4)
            await wait_until_async(
                lambda done=done: len(order) == done, what=f"{expected} admitted"
            )
            assert order[-1] == expected
        await asyncio.gather(*tasks)
        assert pool.loads()[0]["num_running_reqs"] == 1
        assert pool.loads()[0]["gen_throughput"] > 0

    asyncio.run(main())


def test_cancelled_waiters_leave_the_queue_and_pass_on_handed_slots():
    async def main() -> None:
        pool = RankPool(1, capacity=1)
        await pool.admit(0, T)
        waiting = asyncio.create_task(pool.admit(0, T))
        await _queued(pool, 0, 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert pool.loads()[0]["num_waiting_reqs"] == 0
        # a slot handed to a waiter that is cancelled before it runs goes to the next one
        second = asyncio.create_task(pool.admit(0, T))
        third = asyncio.create_task(pool.admit(0, T))
        await _queued(pool, 0, 2)
        pool.release(0, T, 0)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        await third
        load = pool.loads()[0]
        assert (load["num_running_reqs"], load["num_waiting_reqs"]) == (1, 0)

    asyncio.run(main())


def test_fail_mode_refuses_fails_waiters_and_is_skipped():
    async def main() -> None:
        pool = RankPool(3, capacity=1)
        await pool.admit(1, T)
        waiter = asyncio.create_task(pool.admit(1, T))
        await _queued(pool, 1, 1)
        pool.set_mode(1, "fail")
        with pytest.raises(RankUnavailable, match="DP rank 1 is not active"):
            await waiter
        with pytest.raises(RankUnavailable):
            await pool.admit(1, T)
        with pytest.raises(RankUnavailable):
            await pool.checkpoint(1)  # the running request fails at its next step
        assert [pool.pick(None) for _ in range(4)] == [0, 2, 0, 2]
        # pinned to a failed rank: SGLang's DP controller raises (the server goes down)
        with pytest.raises(ControllerCrash, match="DP rank 1 is not active"):
            pool.pick(1)
        with pytest.raises(ValueError, match="out of range"):
            pool.pick(3)
        for r in (0, 2):
            pool.set_mode(r, "fail")
        with pytest.raises(ControllerCrash, match="No active DP workers"):
            pool.pick(None)

    asyncio.run(main())


def test_hang_mode_holds_admission_and_running_requests():
    async def main() -> None:
        pool = RankPool(1, capacity=2)
        await pool.admit(0, T)
        pool.set_mode(0, "hang")
        step = asyncio.create_task(pool.checkpoint(0))
        queued = asyncio.create_task(pool.admit(0, T))
        await _queued(pool, 0, 1)  # and step is blocked at its checkpoint
        assert not step.done() and not queued.done()
        assert pool.loads()[0]["queues"]["paused"] == 1
        pool.set_mode(0, "ok")
        await asyncio.gather(step, queued)
        assert pool.loads()[0]["num_running_reqs"] == 2

    asyncio.run(main())


def test_wait_is_woken_by_a_mode_change_and_close_releases_hung_requests():
    async def main() -> None:
        pool = RankPool(1, capacity=1)
        await pool.admit(0, T)
        sleeper = asyncio.create_task(pool.wait(0, 3600.0))
        await wait_until_async(lambda: pool.ranks[0].sleepers, what="the request asleep")
        pool.set_mode(0, "hang")
        assert await asyncio.wait_for(sleeper, WAIT_TIMEOUT_S) is True
        hung = asyncio.create_task(pool.checkpoint(0))
        queued = asyncio.create_task(pool.admit(0, T))
        await _queued(pool, 0, 1)  # and hung is blocked at its checkpoint
        pool.close()
        for task in (hung, queued):
            with pytest.raises(RankUnavailable, match="shutting down"):
                await task

    asyncio.run(main())


def test_total_requests_picks_the_least_loaded_rank():
    async def main() -> None:
        pool = RankPool(3, capacity=4, load_balance="total_requests")
        await pool.admit(0, T)
        await pool.admit(1, T)
        await pool.admit(1, T)
        assert pool.pick(None) == 2
        await pool.admit(2, T)
        assert pool.pick(None) == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_ranks": 0, "capacity": 1}, "num_ranks"),
        ({"num_ranks": 1, "capacity": 0}, "capacity"),
        ({"num_ranks": 1, "capacity": 1, "load_balance": "random"}, "load balance"),
    ],
)
def test_pool_validates_its_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankPool(**kwargs)


def test_running_requests_traffic_adds_up_and_resets_when_the_rank_empties():
    async def main() -> None:
        pool = RankPool(2, capacity=4)
        other = Ticket(prompt_tokens=1, total_tokens=2, traffic=TokenTraffic(0.7, 0.2, 6.0))
        await pool.admit(0, T)
        await pool.admit(0, other)
        await pool.admit(1, T)
        batch = pool.batch_traffic(0)
        assert batch.node_copies == pytest.approx(1.0) and batch.pairs == pytest.approx(12.0)
        assert batch.intra_node_copies == pytest.approx(0.3)
        pool.release(0, T, 1)
        assert pool.batch_traffic(0).node_copies == pytest.approx(0.7)
        pool.release(0, other, 1)
        assert pool.batch_traffic(0) == TokenTraffic()  # exact zeros, no rounding left
        assert pool.batch_traffic(1) == T.traffic

    asyncio.run(main())


def test_follow_bootstrap_room_picks_room_modulo_ranks_and_pins_win():
    pool = RankPool(4, capacity=1, load_balance="follow_bootstrap_room")
    assert [pool.pick(None, room) for room in (0, 5, 10, 2**62 + 3)] == [0, 1, 2, 3]
    assert pool.pick(3, 4) == 3  # routed_dp_rank is honoured first, as in SGLang
    with pytest.raises(ControllerCrash, match="bootstrap_room should not be None"):
        pool.pick(None, None)
    pool.set_mode(1, "fail", restart_after_s=2.5)
    with pytest.raises(ControllerCrash) as crash:
        pool.pick(None, 9)
    assert crash.value.restart_after_s == 2.5


def test_pd_counters_and_decode_moments_reach_the_loads_rows():
    async def main() -> None:
        pool = RankPool(2, capacity=1)
        row = pool.loads()[0]
        assert row["decode_moments"] is None and row["num_active_tokens"] == 0
        pool.expect_kv(0, 100)
        row = pool.loads(disaggregation_mode="decode")[0]
        assert (row["num_waiting_reqs"], row["num_total_tokens"]) == (1, 100)
        assert row["num_active_tokens"] == 0  # its KV has not arrived
        assert row["disaggregation"]["decode_prealloc_queue_reqs"] == 1
        assert pool.busy(0) and not pool.busy(1)
        pool.expect_kv(0, 100, arrived=True)
        pool.kv_in_flight(1, 1)
        row = pool.loads({"disagg"}, disaggregation_mode="prefill")[1]
        assert row["disaggregation"]["prefill_inflight_queue_reqs"] == 1 and "queues" not in row
        assert "num_running_reqs" in row  # the core fields always come, as in SGLang
        pool.record_prefill(0, 50, 0.02)
        pool.record_decode(0, tokens=8, batch=2, step_s=0.01)
        row = pool.loads({"queues"})[0]
        assert row["total_prefill_uncached_tokens"] == 50
        assert row["total_prefill_busy_us"] == 20000
        assert row["decode_moments"] == pytest.approx([4, 8, 40000, 16, 80000, 8])
        assert row["queues"]["prealloc_ready"] == 0 and "disaggregation" not in row

    asyncio.run(main())
