"""Several SGLang instances behind one scheduler: the configuration, the fleet's rank
numbering, requests spread over instances, and the rank field each version knows."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from scheduler.client import SchedulerClient
from scheduler.errors import ConfigError
from scheduler.server.cluster import load_cluster, side_by_side
from scheduler.server.config import load_config
from scheduler.server.core import build_policy
from tests.emulator_harness import MODEL, EmulatorServer, make_emulator
from tests.server_harness import SchedulerServer, write_config, write_placement


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def _two(tmp: Path, url_a: str, url_b: str, **extra: object) -> list[dict[str, object]]:
    """Instance a (2 nodes x 2 GPUs) and b (1 node x 2 GPUs), each with its placement."""
    return [
        {"name": "a", "url": url_a, "placement": write_placement(tmp / "pa", 2, 2), **extra},
        {"name": "b", "url": url_b, "placement": write_placement(tmp / "pb", 1, 2), **extra},
    ]


def test_instances_tables_make_one_fleet(tmp_path: Path) -> None:
    instances = _two(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    config = load_config(write_config(tmp_path, "", backend={"instances": instances}))
    assert [i.name for i in config.instances] == ["a", "b"]
    cluster = load_cluster(config)
    assert cluster.num_ranks == 6 and cluster.topology.nodes == 3
    a, b = cluster.instances
    assert (a.first_rank, b.first_rank) == (0, 4)
    assert cluster.instance_of(5) is b and cluster.serving_pool.instance_of(3) is a
    # Each instance's static dispatch stays inside its own GPUs.
    assert cluster.dest_gpu[:4].max() < 4 and cluster.dest_gpu[4:].min() >= 4
    # Every class's node shares cover the fleet's nodes and sum to 1.
    for row in cluster.class_to_node_share.values():
        assert len(row) == 3 and abs(sum(row) - 1) < 1e-9
    assert build_policy(config, cluster) is not None


def test_side_by_side_pads_narrower_gpus_without_changing_what_they_hold() -> None:
    from scheduler.emulator.expert_location import trivial_location
    from scheduler.placement.placement import Placement

    narrow = trivial_location(MODEL, 4, 2)  # 64 experts on 4 GPUs: 16 slots each
    layers, experts = narrow.num_layers, narrow.num_experts
    redundant = np.concatenate(  # 2 GPUs x 33 slots: every expert, plus 0 and 1 again
        [np.tile(np.arange(experts), (layers, 1)), np.tile([0, 1], (layers, 1))], axis=1
    )
    wide = Placement(redundant, experts, 2, 2)
    both = side_by_side([narrow, wide])
    assert (both.num_gpus, both.slots_per_gpu, both.num_nodes) == (6, 33, 3)
    present = np.concatenate([narrow.node_presence(), wide.node_presence()], axis=1)
    np.testing.assert_array_equal(both.node_presence(), present)
    per_gpu = np.concatenate([narrow.replicas_per_gpu(), wide.replicas_per_gpu()], axis=2) > 0
    np.testing.assert_array_equal(both.replicas_per_gpu() > 0, per_gpu)


@pytest.mark.parametrize(
    ("backend", "cluster", "message"),
    [
        ({"url": "http://x:1"}, {}, "not both"),
        ({}, {"placement": "p"}, "not both"),
    ],
)
def test_one_form_or_the_other(
    tmp_path: Path, backend: dict[str, str], cluster: dict[str, str], message: str
) -> None:
    instances = _two(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    path = write_config(tmp_path, "", backend={"instances": instances})
    text = path.read_text()
    for key, value in backend.items():
        text = text.replace("[backend]\n", f'[backend]\n{key} = "{value}"\n', 1)
    for key, value in cluster.items():
        text = text.replace("[cluster]\n", f'[cluster]\n{key} = "{value}"\n', 1)
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"role": "prefill"}, "at least one prefill and one decode instance"),
        ({"role": "router"}, "role must be one of"),
        ({"name": "a"}, "name a given more than once"),
        ({"sglang_version": "five"}, "sglang_version"),
        ({"url": "127.0.0.1:2"}, "url must be an http"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_bad_instances_are_refused_with_the_table_named(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    instances = _two(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    instances[1].update(change)
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, "", backend={"instances": instances}))


def test_a_missing_placement_names_the_instance(tmp_path: Path) -> None:
    instances = _two(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    instances[1]["placement"] = tmp_path / "nowhere"
    config = load_config(write_config(tmp_path, "", backend={"instances": instances}))
    with pytest.raises(ConfigError, match=r"backend.instances\[1\] \(b\) placement"):
        load_cluster(config)


def test_prefill_and_decode_instances_form_two_pools(tmp_path: Path) -> None:
    instances = _two(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    instances[0]["role"], instances[1]["role"] = "decode", "prefill"
    config = load_config(write_config(tmp_path, "", backend={"instances": instances}))
    assert [i.role for i in config.instances] == ["prefill", "decode"]  # rank order
    cluster = load_cluster(config)
    assert cluster.disaggregated and cluster.serving_pool.role == "decode"
    prefill, decode = cluster.pools["prefill"], cluster.pools["decode"]
    assert (prefill.first_rank, prefill.num_ranks) == (0, 2)
    assert (decode.first_rank, decode.num_ranks) == (2, 4)
    assert build_policy(config, cluster, "prefill") is not None


def test_requests_spread_over_two_instances_and_report_theirs(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator(nodes=2, gpus_per_node=2)) as a,
        EmulatorServer(make_emulator(nodes=1, gpus_per_node=2)) as b,
    ):
        config = write_config(
            tmp_path,
            "",
            backend={"instances": _two(tmp_path, a.url, b.url)},
            policy={"name": "round_robin", "capacity": 4, "window_ms": 0.0},
        )
        with SchedulerServer(config) as s:

            async def go() -> None:
                async with SchedulerClient(s.target) as client:
                    replies = await asyncio.gather(
                        *(client.generate(f"hello {i}", max_new_tokens=2) for i in range(12))
                    )
                    stats = await client.stats()
                    placement = await client.placement()
                return replies, stats, placement

            replies, stats, placement = run(go())
    by_instance = {"a": 0, "b": 0}
    for reply in replies:
        by_instance[reply.info.instance] += 1
        limit = 4 if reply.info.instance == "a" else 2
        assert 0 <= reply.info.dp_rank < limit
    assert by_instance["a"] > 0 and by_instance["b"] > 0
    assert [(r.instance, r.rank) for r in stats.ranks] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 0),
        ("b", 1),
    ]
    assert sum(r.dispatched for r in stats.ranks) == 12
    assert [i.name for i in placement.instances] == ["a", "b"]
    assert placement.expert_location_json == ""  # several instances: see instances


def _served(*servers: EmulatorServer) -> list[dict[str, object]]:
    """Every request the emulators logged (the log outlives an instance's death)."""
    return [row for s in servers for row in s.emulator.requests.to_json()["requests"]]


def test_an_instance_killed_mid_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Two mixed instances; one dies (connections reset, then refused) with requests in
    flight. Every call ends; an OK reply was served exactly once; a stream cut after its
    first tokens ends UNAVAILABLE and was never also answered elsewhere."""
    import grpc

    from tests.emulator_harness import post

    with (
        EmulatorServer(make_emulator(nodes=2, gpus_per_node=2, time_scale=1.0)) as a,
        EmulatorServer(make_emulator(nodes=1, gpus_per_node=2, time_scale=1.0)) as b,
    ):
        config = write_config(
            tmp_path,
            "",
            backend={"instances": _two(tmp_path, a.url, b.url), "health_interval_s": 0.1},
            policy={"name": "round_robin", "capacity": 8, "window_ms": 0.0},
        )
        with SchedulerServer(config) as s:

            async def call(i: int) -> tuple[str, str]:
                rid = f"r{i}"
                try:
                    if i % 3:
                        await client.generate(
                            f"q {i}", max_new_tokens=24, request_id=rid, timeout=30
                        )
                    else:
                        stream = client.generate_stream(
                            f"q {i}", max_new_tokens=24, request_id=rid, timeout=30
                        )
                        async for _ in stream:
                            pass
                    return rid, "OK"
                except grpc.aio.AioRpcError as e:
                    return rid, e.code().name

            async def go() -> list[tuple[str, str]]:
                calls = [asyncio.ensure_future(call(i)) for i in range(90)]
                await asyncio.sleep(0.3)
                status, _ = await asyncio.to_thread(
                    post, b.url + "/admin/instance", {"mode": "die"}
                )
                assert status == 200
                return await asyncio.gather(*calls)

            async def main() -> list[tuple[str, str]]:
                nonlocal client
                async with SchedulerClient(s.target) as client:
                    outcomes = await go()
                    stats = await client.stats()
                    assert not any(r.healthy for r in stats.ranks if r.instance == "b")
                return outcomes

            client: SchedulerClient
            outcomes = run(main())

    def ok_on(server: EmulatorServer) -> list[str]:
        return [str(r["rid"]) for r in _served(server) if r["outcome"] == "ok"]

    on_a, on_b = ok_on(a), ok_on(b)
    assert len(set(on_a)) == len(on_a) and len(set(on_b)) == len(on_b)
    for rid, status in outcomes:
        if status == "OK":
            # Answered by a, or by b before it died. Both only when b finished it but its
            # answer was lost in the crash (the attempt on a is the one the client got).
            assert rid in on_a or rid in on_b, rid
        else:
            assert status == "UNAVAILABLE", (rid, status)  # a stream cut after its tokens
            assert rid not in on_a and int(rid[1:]) % 3 == 0  # never retried
    assert sum(status == "OK" for _, status in outcomes) >= 60  # the unary calls at least
    assert any(row["outcome"] == "error" for row in _served(b))  # b did die mid-request


def test_prefill_and_decode_legs_carry_the_pairing_fields(tmp_path: Path) -> None:
    """A prefill instance and a decode instance: each request runs on both, with the
    same room, the prefill's bootstrap address, each leg pinned to its rank and the
    decode leg naming the prefill's; the reply names both legs."""
    with (
        EmulatorServer(make_emulator(nodes=1, gpus_per_node=2, role="prefill")) as p,
        EmulatorServer(make_emulator(nodes=2, gpus_per_node=2, role="decode")) as d,
    ):
        assert p.bootstrap is not None
        instances = _two(tmp_path, d.url, p.url)
        instances[0]["role"], instances[1]["role"] = "decode", "prefill"
        config = write_config(
            tmp_path,
            "",
            backend={"instances": instances},
            policy={"name": "locality_window", "capacity": 4, "window_ms": 1.0},
        )
        with SchedulerServer(config) as s:

            async def go() -> list[object]:
                async with SchedulerClient(s.target) as client:
                    replies = [
                        await client.generate(f"solve {i} + x = 7", max_new_tokens=3)
                        for i in range(4)
                    ]
                    chunks = [c async for c in client.generate_stream("hi", max_new_tokens=3)]
                    chat = await client.chat([("user", "hi")], max_new_tokens=3)  # OpenAI's
                    stats = await client.stats()
                    assert {r.role for r in stats.ranks} == {"prefill", "decode"}
                    return [*replies, chunks[-1], chat]

            answers = run(go())
        prefill_rows = {r["rid"]: r for r in _served(p)}
        decode_rows = {r["rid"]: r for r in _served(d)}
    assert len(prefill_rows) == len(decode_rows) == 6
    for answer in answers:
        info = answer.info  # type: ignore[attr-defined]
        assert (info.instance, info.prefill_instance) == ("a", "b")
        assert info.completion_tokens == 3 and info.HasField("prefill_dp_rank")
    for rid, decode in decode_rows.items():
        prefill = prefill_rows[rid]
        assert prefill["outcome"] == decode["outcome"] == "ok"
        assert prefill["bootstrap_room"] == decode["bootstrap_room"]
        assert (decode["bootstrap_host"], decode["bootstrap_port"]) == p.bootstrap
        assert decode["disagg_prefill_dp_rank"] == prefill["dp_rank"]
        assert prefill["pinned_field"] == decode["pinned_field"] == "routed_dp_rank"
    assert sum(d.emulator.requests.prefill_rank_honoured) == 6


def test_an_old_sglang_gets_the_old_rank_field(tmp_path: Path) -> None:
    """SGLang 0.5.9 knows only data_parallel_rank (routed_dp_rank would be dropped), on
    /generate and on its OpenAI endpoints: the scheduler reads the version from
    /server_info and the pin holds."""
    with EmulatorServer(make_emulator(sglang_version="0.5.9")) as emu:
        config = write_config(tmp_path, emu.url, policy={"name": "round_robin"})
        with SchedulerServer(config) as s:

            async def go() -> list[int]:
                async with SchedulerClient(s.target) as client:
                    replies = [await client.generate(f"p{i}", max_new_tokens=2) for i in range(7)]
                    replies.append(await client.chat([("user", "p7")], max_new_tokens=2))
                    return [r.info.dp_rank for r in replies]

            chosen = run(go())
        rows = _served(emu)
    assert [row["pinned_field"] for row in rows] == ["data_parallel_rank"] * 8
    assert [row["dp_rank"] for row in rows] == chosen  # ran where the scheduler chose


def test_a_prefill_instance_killed_mid_load_loses_no_request(tmp_path: Path) -> None:
    """Two prefill instances and a decode instance; a prefill instance dies with pairs
    in flight. Both legs of an unfinished pair are sent again (a new room) to the other
    prefill instance; every call is answered once."""
    from tests.emulator_harness import post

    def prefill() -> EmulatorServer:
        return EmulatorServer(
            make_emulator(nodes=1, gpus_per_node=2, role="prefill", time_scale=1.0)
        )

    with (
        prefill() as p1,
        prefill() as p2,
        EmulatorServer(make_emulator(nodes=1, gpus_per_node=2, role="decode", time_scale=1.0)) as d,
    ):
        instances = [
            {
                "name": "p1",
                "url": p1.url,
                "role": "prefill",
                "placement": write_placement(tmp_path / "q1", 1, 2),
            },
            {
                "name": "p2",
                "url": p2.url,
                "role": "prefill",
                "placement": write_placement(tmp_path / "q2", 1, 2),
            },
            {
                "name": "d",
                "url": d.url,
                "role": "decode",
                "placement": write_placement(tmp_path / "q3", 1, 2),
            },
        ]
        config = write_config(
            tmp_path,
            "",
            backend={"instances": instances, "health_interval_s": 0.1},
            policy={"name": "round_robin", "capacity": 8, "window_ms": 0.0},
        )
        with SchedulerServer(config) as s:

            async def go() -> list[object]:
                for rank in (0, 1):  # p1's prefills hang, so pairs are in flight there
                    await asyncio.to_thread(post, f"{p1.url}/admin/ranks/{rank}", {"mode": "hang"})
                async with SchedulerClient(s.target) as client:
                    calls = [
                        asyncio.ensure_future(
                            client.generate(
                                f"q {i}", max_new_tokens=8, request_id=f"r{i}", timeout=30
                            )
                        )
                        for i in range(40)
                    ]
                    await asyncio.sleep(0.5)
                    status, _ = await asyncio.to_thread(
                        post, p1.url + "/admin/instance", {"mode": "die"}
                    )
                    assert status == 200
                    return await asyncio.gather(*calls)

            replies = run(go())
        decode_ok = [r["rid"] for r in _served(d) if r["outcome"] == "ok"]
        cut = [r["rid"] for r in _served(p1) if r["outcome"] != "ok"]
    assert cut  # p1 did die with pairs in flight
    assert sorted(decode_ok) == sorted(f"r{i}" for i in range(40))  # each answered once
    assert all(r.info.completion_tokens == 8 for r in replies)  # type: ignore[attr-defined]
    assert {r.info.prefill_instance for r in replies} >= {"p2"}  # type: ignore[attr-defined]


def test_a_slow_health_check_is_not_a_dead_instance(tmp_path: Path) -> None:
    """/health that times out (a busy instance) takes it out only after three rounds in
    a row; a refused or reset one (None vs False from the backend) at once."""
    from scheduler.server.core import SLOW_HEALTH_ROUNDS, SchedulerCore

    config = load_config(
        write_config(tmp_path, "http://127.0.0.1:9", feedback={"worker": "thread"})
    )

    async def go() -> list[bool]:
        core = SchedulerCore(config)
        inst = core.cluster.instances[0]
        backend = core.backends[inst.name]
        answers = iter([True] + [None] * SLOW_HEALTH_ROUNDS + [True, False])

        async def health(timeout_s: float) -> bool | None:
            return next(answers)

        async def loads(ranks: int, timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
            return np.zeros(ranks, dtype=np.int64), np.zeros(ranks, dtype=np.int64)

        async def server_info(timeout_s: float) -> dict[str, object]:
            return {"version": "0.5.23"}

        backend.health, backend.loads, backend.server_info = health, loads, server_info  # type: ignore[method-assign]
        seen = []
        for _ in range(SLOW_HEALTH_ROUNDS + 3):
            await core._poll_once(inst)
            seen.append(core.instance_up[inst.name])
        core.telemetry.close()
        await backend.close()
        return seen

    up = run(go())
    slow = SLOW_HEALTH_ROUNDS
    assert up == [True] * slow + [False, True, False]
