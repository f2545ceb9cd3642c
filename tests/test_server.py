"""The gRPC scheduler in front of a real emulator, both on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import grpc
import pytest

from scheduler.cli import main
from scheduler.client import SchedulerClient, make_request
from scheduler.profile import load_profile, parse_profile
from tests.conftest import WAIT_TIMEOUT_S, wait_until
from tests.emulator_harness import EmulatorServer, get, make_emulator, post
from tests.server_harness import SchedulerServer, write_config, write_placement


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_unary_and_streaming_generation(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator()) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                reply = await client.generate("solve 2x + 3 = 7 for x", max_new_tokens=5)
                assert reply.info.completion_tokens == 5
                assert len(reply.output_ids) == 5
                assert 0 <= reply.info.dp_rank < 4
                assert reply.info.prediction_source == "text"
                assert reply.info.predicted_class == "law"  # math -> law stand-in
                assert reply.info.HasField("local_fraction")
                chunks = [c async for c in client.generate_stream("hello there", max_new_tokens=4)]
                assert chunks[-1].finished and chunks[-1].info.completion_tokens == 4
                assert sum(len(c.output_ids) for c in chunks[:-1]) == 4
                stats = await client.stats()
                assert stats.requests_ok == 2 and stats.token_layers > 0

        run(go())


def _loads(url: str) -> list[dict]:  # type: ignore[type-arg]
    status, body = get(url + "/v1/loads")
    assert status == 200
    return body["loads"]


def test_requests_run_on_the_rank_the_scheduler_chose(tmp_path: Path) -> None:
    with EmulatorServer(make_emulator()) as emu:
        config = write_config(tmp_path, emu.url, policy={"name": "round_robin"})
        with SchedulerServer(config) as s:

            async def go() -> list[int]:
                async with SchedulerClient(s.target) as client:
                    replies = [
                        await client.generate(f"prompt {i}", max_new_tokens=2) for i in range(8)
                    ]
                    return [r.info.dp_rank for r in replies]

            ranks = run(go())
        assert ranks == [0, 1, 2, 3, 0, 1, 2, 3]
        finished = [row["emulator"]["finished_reqs"] for row in _loads(emu.url)]
        assert finished == [2, 2, 2, 2]


def test_class_affinity_sends_a_class_to_its_node(tmp_path: Path) -> None:
    with EmulatorServer(make_emulator()) as emu:
        placement = write_placement(tmp_path / "placement", 2, 2)
        plan = json.loads((placement / "plan.json").read_text())
        plan["class_to_node_share"]["law"] = [0.0, 1.0]
        (placement / "plan.json").write_text(json.dumps(plan))
        config = write_config(tmp_path, emu.url, policy={"name": "class_affinity"})
        with SchedulerServer(config) as s:

            async def go() -> set[int]:
                async with SchedulerClient(s.target) as client:
                    nodes = set()
                    for _ in range(4):
                        reply = await client.generate("x", class_hint="law", max_new_tokens=1)
                        assert reply.info.prediction_source == "hint"
                        nodes.add(reply.info.node)
                    return nodes

            assert run(go()) == {1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "   "}, "empty"),
        ({"prompt": "x" * 5000}, "characters"),
        ({"prompt": []}, "input_ids is empty"),
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "max_new_tokens": 100_000}, "max_new_tokens"),
        ({"prompt": "hi", "class_hint": "poetry"}, "unknown class_hint"),
    ],
)
def test_bad_input_is_invalid_argument(tmp_path: Path, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with EmulatorServer(make_emulator()) as emu:
        config = write_config(
            tmp_path,
            emu.url,
            server={
                "listen": "127.0.0.1:0",
                "metrics_listen": "127.0.0.1:0",
                "max_prompt_chars": 4000,
            },
        )
        with SchedulerServer(config) as s:

            async def go() -> None:
                async with SchedulerClient(s.target) as client:
                    prompt = kwargs.pop("prompt")
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await client.generate(prompt, **kwargs)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert message in err.value.details()

            run(go())


def test_a_failed_rank_takes_its_instance_down_and_requests_survive_the_restart(
    tmp_path: Path,
) -> None:
    """As in SGLang, a request pinned to an inactive rank takes the whole instance down
    (connections reset, then refused). Requests that sent no token wait for the restart
    and are answered once each."""
    with EmulatorServer(make_emulator()) as emu:
        status, _ = post(emu.url + "/admin/ranks/1", {"mode": "fail", "restart_after_s": 1.5})
        assert status == 200
        config = write_config(tmp_path, emu.url, policy={"name": "round_robin"})
        with SchedulerServer(config) as s:

            async def go() -> None:
                async with SchedulerClient(s.target) as client:
                    replies = await asyncio.gather(
                        *(
                            client.generate(f"p{i}", max_new_tokens=2, request_id=f"r{i}")
                            for i in range(20)
                        )
                    )
                    assert any(r.info.attempts >= 2 for r in replies)
                    stats = await client.stats()
                    assert stats.requests_ok == 20 and stats.requests_failed == 0
                    assert stats.reroutes >= 1
                    assert all(r.in_flight == 0 for r in stats.ranks)

            run(go())
        _, log = get(emu.url + "/admin/requests")
    ok = [r["rid"] for r in log["requests"] if r["outcome"] == "ok"]
    assert sorted(ok) == sorted(f"r{i}" for i in range(20))  # each answered once


def _wait_idle(emu_url: str, s: SchedulerServer) -> None:
    """Until the backend runs and queues nothing and the scheduler has nothing in flight."""
    seen: list[object] = []

    def idle() -> bool:
        rows = _loads(emu_url)
        in_flight = s.call(lambda: int(s.running.core.dispatcher.in_flight.sum()))  # type: ignore[union-attr]
        seen[:] = [rows, in_flight]
        busy = any(r["num_running_reqs"] or r["num_waiting_reqs"] for r in rows)
        return not busy and not in_flight

    wait_until(idle, what=lambda: f"backend or scheduler still busy: loads, in flight {seen}")


def test_client_cancellation_aborts_the_backend_request(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator(time_scale=1.0)) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                call = client.stub.GenerateStream(make_request("hi", max_new_tokens=2000))
                async for chunk in call:
                    assert not chunk.finished
                    break  # got the first token
                call.cancel()

        run(go())
        _wait_idle(emu.url, s)
        text = urllib.request.urlopen(s.running.metrics_url).read().decode()  # type: ignore[union-attr]
        assert 'moe_scheduler_requests_total{outcome="cancelled"} 1.0' in text


def test_deadline_expiry(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator(time_scale=1.0)) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.generate("hi", max_new_tokens=2000, timeout=0.3)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        run(go())
        _wait_idle(emu.url, s)


def test_overload_is_resource_exhausted(tmp_path: Path) -> None:
    with EmulatorServer(make_emulator(time_scale=1.0)) as emu:
        config = write_config(
            tmp_path,
            emu.url,
            policy={"name": "total_requests", "capacity": 1},
            server={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "max_queue": 2},
        )
        with SchedulerServer(config) as s:

            async def go() -> None:
                async with SchedulerClient(s.target) as client:
                    calls = [
                        asyncio.ensure_future(
                            client.generate(f"p{i}", max_new_tokens=2000, timeout=3)
                        )
                        for i in range(7)  # 4 ranks x 1 slot, 2 queued, 1 refused
                    ]
                    done = await asyncio.gather(*calls, return_exceptions=True)
                    codes = [d.code() for d in done if isinstance(d, grpc.aio.AioRpcError)]
                    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 1

            run(go())


def test_reload_valid_and_invalid(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("s3cret\n")
    admin = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}
    admin["admin_token_file"] = str(tmp_path / "admin.token")
    with EmulatorServer(make_emulator()) as emu:
        config = write_config(tmp_path, emu.url, policy={"name": "total_requests"}, server=admin)
        with SchedulerServer(config) as s:

            async def go() -> None:
                async with SchedulerClient(s.target, token="s3cret") as client:
                    assert (await client.placement()).policy == "total_requests"
                    write_config(tmp_path, emu.url, policy={"name": "round_robin"}, server=admin)
                    reply = await client.reload()
                    assert reply.ok, reply.message
                    assert (await client.placement()).policy == "round_robin"
                    write_config(tmp_path, emu.url, policy={"name": "no_such_policy"}, server=admin)
                    reply = await client.reload()
                    assert not reply.ok and "no_such_policy" in reply.message
                    assert (await client.placement()).policy == "round_robin"
                    config.write_text("not toml [")
                    assert not (await client.reload()).ok
                    await client.generate("still serving", max_new_tokens=1)

            run(go())


def test_feedback_updates_statistics_and_profile(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator()) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                for text in ("solve 2x + 3 = 7 for x", "def add(a, b): return a + b"):
                    await client.generate(text, max_new_tokens=8)
                stats = await client.stats()
                assert stats.token_layers > 0 and stats.prediction_checks == 2
                fb = await client.feedback()
                # each node holds half the experts (trivial, 2 nodes): some hits are remote
                assert stats.remote_hits > 0 and stats.inter_node_bytes > 0
                per_token = stats.inter_node_bytes / fb.tokens
                assert stats.inter_node_bytes_per_token == pytest.approx(per_token)
                profile = parse_profile(json.loads(fb.profile_json), tmp_path / "fb.json")
                assert set(profile.classes) == {"law", "translation"}
                assert fb.placement_version == (await client.placement()).version

        run(go())
        # the next placement from what the server measured
        topology = tmp_path / "t.toml"
        topology.write_text("[cluster]\nnodes = 2\ngpus_per_node = 2\n")
        out = tmp_path / "next"
        argv = [
            "place",
            "--from-server",
            s.target,
            "--topology",
            str(topology),
            "--method",
            "trivial",
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        assert (out / "expert_location.json").exists()
        assert load_profile(tmp_path / "next.profile.json").classes["law"].requests == 1
    # flushed on shutdown
    flushed = load_profile(tmp_path / "feedback" / "profile.json")
    assert flushed.classes["law"].requests == 1
    assert (tmp_path / "feedback" / "buffer.jsonl").read_text().count("\n") == 2


def test_health_reflection_and_metrics(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with (
        EmulatorServer(make_emulator()) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):
        with grpc.insecure_channel(s.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # Watch streams the service's status, the current one first, then each change:
            # waiting on it needs no polling; the deadline bounds the call.
            request = health_pb2.HealthCheckRequest(service="moe_scheduler.v1.Scheduler")
            watch = stub.Watch(request, timeout=WAIT_TIMEOUT_S)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert any(reply.status == serving for reply in watch), "never SERVING"
            watch.cancel()
            reply = stub.Check(request)
            assert reply.status == serving
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert "moe_scheduler.v1.Scheduler" in services

        async def one() -> int:
            async with SchedulerClient(s.target) as client:
                return (await client.generate("hi", max_new_tokens=2)).info.dp_rank

        rank = run(one())
        text = urllib.request.urlopen(s.running.metrics_url).read().decode()  # type: ignore[union-attr]
        # the metrics count what happened (prometheus_client prints a name on registration)
        assert 'moe_scheduler_requests_total{outcome="ok"} 1.0' in text
        assert "moe_scheduler_ttft_seconds_count 1.0" in text
        assert rank in range(4)


def test_two_replicas_never_oversubscribe_a_rank(tmp_path: Path) -> None:
    emulator = make_emulator(capacity=2, time_scale=0.2)
    with EmulatorServer(emulator) as emu:
        configs = []
        for i in range(2):
            d = tmp_path / f"r{i}"
            d.mkdir()
            configs.append(
                write_config(
                    d,
                    emu.url,
                    policy={"name": "total_requests", "capacity": 2},
                    server={
                        "listen": "127.0.0.1:0",
                        "metrics_listen": "127.0.0.1:0",
                        "replicas": 2,
                    },
                )
            )
        with SchedulerServer(configs[0]) as a, SchedulerServer(configs[1]) as b:

            async def go() -> None:
                async with SchedulerClient(a.target) as ca, SchedulerClient(b.target) as cb:
                    calls = [
                        (ca if i % 2 else cb).generate(f"p{i}", max_new_tokens=20)
                        for i in range(40)
                    ]
                    replies = await asyncio.gather(*calls)
                    assert len(replies) == 40

            run(go())
        rows = _loads(emu.url)
        assert sum(r["emulator"]["finished_reqs"] for r in rows) == 40
        assert all(r["emulator"]["queued_reqs_total"] == 0 for r in rows), rows


def test_placement_version_is_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scheduler.errors import ConfigError
    from scheduler.server.cluster import load_cluster
    from scheduler.server.config import load_config

    config = load_config(write_config(tmp_path, "http://127.0.0.1:1"))
    version = load_cluster(config).version
    monkeypatch.setenv("MOE_SCHEDULER_PLACEMENT_VERSION", version)
    assert load_cluster(config).version == version
    monkeypatch.setenv("MOE_SCHEDULER_PLACEMENT_VERSION", "0" * 16)
    with pytest.raises(ConfigError, match="refusing to serve"):
        load_cluster(config)


def _learned_bundle(path: Path, won: bool) -> Path:
    """A bundle for the emulator's model with a text -> cluster classifier on the
    harness prompts (code/math -> cluster 0, chat/general -> cluster 1)."""
    import numpy as np

    from scheduler.prediction.bundle import PredictorBundle, save_bundle
    from scheduler.prediction.clusters import ActivationClusters
    from scheduler.prediction.text_classifier import TextClassifier
    from scheduler.prediction.text_cluster import TextClusterClassifier
    from tests.emulator_harness import MODEL
    from tests.server_harness import PROMPTS

    texts = [t for ts in PROMPTS.values() for t in ts]
    domains = [d for d, ts in PROMPTS.items() for _ in ts]
    counts = np.ones((len(texts), MODEL.num_moe_layers, MODEL.num_experts))
    for i, d in enumerate(domains):
        counts[i, :, :8] += 50 if d in ("code", "math") else 0
    domain = TextClassifier().fit(texts, domains)
    clusters = ActivationClusters(2).fit(counts)
    tc = TextClusterClassifier(clusters, text=TextClassifier(features=domain.features_))
    tc.fit(texts, counts)
    choice = {"use": "text_cluster" if won else "class_map", "why": "test"}
    bundle = PredictorBundle(
        domain=domain,
        model=MODEL,
        clusters=clusters,
        text_cluster=tc,
        metadata={"text_predictor": choice},
    )
    save_bundle(bundle, path)
    return path


@pytest.mark.parametrize("won", [True, False])
def test_text_mode_uses_the_learned_predictor_when_it_won(tmp_path: Path, won: bool) -> None:
    placement = write_placement(tmp_path / "placement", 2, 2)
    plan = json.loads((placement / "plan.json").read_text())
    plan["class_to_node_share"] = {"cluster-0": [1.0, 0.0], "cluster-1": [0.0, 1.0]}
    (placement / "plan.json").write_text(json.dumps(plan))
    _learned_bundle(tmp_path / "bundle.npz", won)
    with (
        EmulatorServer(make_emulator()) as emu,
        SchedulerServer(write_config(tmp_path, emu.url, prediction={"class_map": {}})) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                reply = await client.generate(
                    "write a python function to sort a list", max_new_tokens=2
                )
                stats = await client.stats()
                if won:
                    assert stats.text_predictor == "text_cluster"
                    assert reply.info.predicted_class.startswith("cluster-")
                else:
                    assert stats.text_predictor == "class_map"
                    assert "did not win" in stats.text_predictor_reason

        run(go())
