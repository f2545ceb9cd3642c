"""The data plane against a real emulator on loopback: long streams with routed experts,
bad input answered with its code, admin RPCs behind a token, TLS, counters that equal
what clients saw, and telemetry dropped (never requests) when the worker is full."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from scheduler.api.v1 import scheduler_pb2 as pb
from scheduler.client import SchedulerClient, make_request
from scheduler.errors import ConfigError, DeadlineRefused
from scheduler.server.config import load_config
from scheduler.server.dispatcher import Dispatcher
from scheduler.server.telemetry import MeasureContext, TelemetryWorker
from tests.emulator_harness import MODEL, EmulatorServer, make_emulator
from tests.server_harness import SchedulerServer, write_config

LISTEN = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_a_stream_of_4096_tokens_with_routed_experts_completes(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator()) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                chunks = [c async for c in client.generate_stream("hello", max_new_tokens=4096)]
                last = chunks[-1]
                assert last.finished and last.info.completion_tokens == 4096
                assert sum(len(c.output_ids) for c in chunks[:-1]) == 4096
                assert last.info.HasField("local_fraction")  # 4096 x 27 x 6 routed ids read
                stats = await client.stats()
                assert stats.outcomes["ok"] == 1 and stats.telemetry_accounted == 1

        run(go())


def _raw_generate(target: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/moe_scheduler.v1.Scheduler/Generate",
            request_serializer=lambda b: b,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(payload, timeout=10)
        return err.value


def test_every_bad_input_gets_its_code_and_a_bounded_message(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "http://127.0.0.1:9", server=LISTEN, cluster={"vocab_size": 1000}
    )
    with SchedulerServer(config) as s:
        for payload in (
            b"\x12\x02\xff\xfe",  # text = invalid UTF-8
            b"\x12\x10abc",  # truncated
            b"\x02\x01a",  # field number 0
        ):
            err = _raw_generate(s.target, payload)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "does not decode" in err.details()

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                cases = [
                    (make_request("hi", class_hint="x" * 1_000_000), "class_hint has"),
                    (make_request("hi", request_id="a\nforged log line"), "control characters"),
                    (make_request([1, 2, 5000]), "vocabulary has 1000"),
                ]
                many_stops = make_request("hi")
                many_stops.sampling.stop.extend(["s"] * 10_000)
                cases.append((many_stops, "10000 stop strings"))
                for request, message in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await client.stub.Generate(request, timeout=10)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert message in err.value.details()
                    assert len(err.value.details()) < 300
                stats = await client.stats()
                assert stats.outcomes["invalid"] == 7

        run(go())


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_config_floats_must_be_finite(tmp_path: Path, value: str) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:9")
    path.write_text(path.read_text().replace("window_ms = 0.0", f"window_ms = {value}"))
    with pytest.raises(ConfigError, match="finite"):
        load_config(path)


def test_admin_rpcs_need_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with EmulatorServer(make_emulator()) as emu:
        with SchedulerServer(write_config(tmp_path, emu.url)) as s:  # no token configured

            async def denied() -> None:
                async with SchedulerClient(s.target, token="anything") as client:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await client.reload()
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

            run(denied())
        monkeypatch.setenv("MOE_SCHEDULER_ADMIN_TOKEN", "t0ken")
        with SchedulerServer(write_config(tmp_path, emu.url)) as s:

            async def checked() -> None:
                for token in ("", "wrong"):
                    async with SchedulerClient(s.target, token=token) as client:
                        with pytest.raises(grpc.aio.AioRpcError) as err:
                            await client.reload()
                        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                async with SchedulerClient(s.target, token="t0ken") as client:
                    assert (await client.reload()).ok

            run(checked())


def test_tls(tmp_path: Path) -> None:
    ca_key, ca, key, csr, cert = (
        tmp_path / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    )
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")
    commands = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca]
        + ["-days", "1", "-subj", "/CN=test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr]
        + ["-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
        + ["-out", cert, "-days", "1", "-extfile", ext],
    ]
    for args in commands:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    with EmulatorServer(make_emulator()) as emu:
        tls = {**LISTEN, "tls_cert": str(cert), "tls_key": str(key)}
        with SchedulerServer(write_config(tmp_path, emu.url, server=tls)) as s:

            async def go() -> None:
                async with SchedulerClient(s.target, tls_ca=ca.read_bytes()) as client:
                    reply = await client.generate("over TLS", max_new_tokens=2, timeout=10)
                    assert reply.info.completion_tokens == 2
                async with SchedulerClient(s.target) as plain:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await plain.generate("plaintext", max_new_tokens=2, timeout=2)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            run(go())


def test_counters_equal_what_clients_saw(tmp_path: Path) -> None:
    with EmulatorServer(make_emulator(time_scale=1.0)) as emu:
        config = write_config(
            tmp_path,
            emu.url,
            policy={"name": "total_requests", "capacity": 1, "window_ms": 0.0},
            server={**LISTEN, "max_queue": 1},
        )
        with SchedulerServer(config) as s:

            async def cancel_after_first_token(client: SchedulerClient) -> str:
                call = client.stub.GenerateStream(make_request("cancel me", max_new_tokens=2000))
                async for _ in call:
                    break
                call.cancel()
                return "cancelled"

            async def outcome(coro) -> str:  # type: ignore[no-untyped-def]
                try:
                    await coro
                    return "ok"
                except grpc.aio.AioRpcError as e:
                    return e.code().name

            async def go() -> None:
                async with SchedulerClient(s.target) as client:
                    seen = [
                        await outcome(client.generate("short", max_new_tokens=2, timeout=30)),
                        await outcome(client.generate("   ", max_new_tokens=2)),
                        await cancel_after_first_token(client),
                        await outcome(client.generate("slow", max_new_tokens=2000, timeout=0.3)),
                    ]
                    # 4 ranks x 1 slot + 1 queued: the 6th of 6 concurrent calls is refused
                    burst = await asyncio.gather(
                        *(
                            outcome(client.generate(f"b{i}", max_new_tokens=40, timeout=30))
                            for i in range(6)
                        )
                    )
                    seen += burst
                    deadline = time.monotonic() + 10
                    while (stats := await client.stats()).in_progress:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.05)
                    assert seen[:4] == ["ok", "INVALID_ARGUMENT", "cancelled", "DEADLINE_EXCEEDED"]
                    assert burst.count("RESOURCE_EXHAUSTED") == 1
                    expected = {
                        "ok": seen.count("ok"),
                        "invalid": 1,
                        "cancelled": 1,
                        "client_deadline": 1,
                        "overloaded": 1,
                    }
                    counted = {k: v for k, v in stats.outcomes.items() if v}
                    assert counted == expected
                    assert stats.requests_ok == expected["ok"]
                    assert stats.requests_failed == 4

            run(go())


def test_one_connection_reaches_the_admission_bound_before_http2s(tmp_path: Path) -> None:
    """More calls at once on one connection than server.max_concurrent_rpcs, and more
    than grpc-core's usual 1,024 streams: the excess is RESOURCE_EXHAUSTED from the
    scheduler's admission and counted, never HTTP/2's REFUSED_STREAM (UNAVAILABLE at the
    client, which the scheduler never sees)."""
    with EmulatorServer(make_emulator()) as emu:
        config = write_config(tmp_path, emu.url, server={**LISTEN, "max_concurrent_rpcs": 1100})
        with SchedulerServer(config) as s:

            async def outcome(client: SchedulerClient, i: int) -> str:
                try:
                    await client.generate(f"p{i}", max_new_tokens=2, timeout=120)
                    return "OK"
                except grpc.aio.AioRpcError as e:
                    return e.code().name

            async def go() -> None:
                async with SchedulerClient(s.target) as client:  # one connection
                    seen = await asyncio.gather(*(outcome(client, i) for i in range(1300)))
                    stats = await client.stats()
                assert set(seen) <= {"OK", "RESOURCE_EXHAUSTED"}, set(seen)
                assert stats.outcomes["overloaded"] == seen.count("RESOURCE_EXHAUSTED")
                assert stats.outcomes["ok"] == seen.count("OK")

            run(go())


def test_the_loop_lag_guard_averages_over_a_second() -> None:
    """One slow callback (or a moment when another process has the CPU) does not trip
    server.max_loop_lag_ms; a loop that stays late does, within about a second, and the
    average falls back once it catches up."""
    from scheduler.server.core import smoothed_lag

    lag, probe = 0.0, 0.02
    lag = smoothed_lag(lag, 0.3, probe + 0.3)  # one 300 ms stall
    assert lag < 0.1
    for _ in range(50):  # then on time again
        lag = smoothed_lag(lag, 0.0, probe)
    assert lag < 0.05
    elapsed = 0.0
    while lag <= 0.25:  # 300 ms late at every probe
        lag = smoothed_lag(lag, 0.3, probe + 0.3)
        elapsed += probe + 0.3
    assert 0.5 < elapsed < 2.5
    while lag > 0.25:
        lag = smoothed_lag(lag, 0.0, probe)
    assert smoothed_lag(0.0, -1.0, probe) == 0.0


def _context() -> MeasureContext:
    from scheduler.accounting import static_dispatch_table
    from scheduler.emulator.expert_location import trivial_location
    from scheduler.placement.topology import Topology

    placement = trivial_location(MODEL, 4, 2)
    return MeasureContext(
        MODEL,
        Topology(2, 2),
        placement,
        static_dispatch_table(placement),
        placement.node_presence(),
    )


def test_a_full_worker_drops_telemetry_not_requests(tmp_path: Path) -> None:
    from scheduler.traces.importers.sglang_generate import encode_routed_experts

    ids = np.zeros((50, MODEL.num_hidden_layers, MODEL.top_k), dtype=np.int32)
    encoded = encode_routed_experts(ids).encode()

    async def go() -> None:
        worker = TelemetryWorker(_context(), "thread", max_pending=1)
        try:
            first = worker.submit(encoded, 0, 10)
            assert first is not None
            assert worker.submit(encoded, 1, 10) is None  # full: dropped and counted
            assert worker.dropped == 1
            obs = await first
            assert obs.token_layers == 50 * MODEL.num_moe_layers
            assert worker.submit(b"not base64!", 0, 1) is not None
            await asyncio.sleep(0.2)
            assert worker.failed == 1 and worker.accounted == 1
        finally:
            worker.close()

    run(go())
    # and through a server: a one-slot worker queue under a burst serves every request
    with EmulatorServer(make_emulator()) as emu:
        config = write_config(tmp_path, emu.url, feedback={"max_pending": 1, "dir": str(tmp_path)})
        with SchedulerServer(config) as s:

            async def burst() -> None:
                async with SchedulerClient(s.target) as client:
                    replies = await asyncio.gather(
                        *(client.generate(f"p{i}", max_new_tokens=64) for i in range(40))
                    )
                    assert len(replies) == 40
                    stats = await client.stats()
                    assert stats.outcomes["ok"] == 40
                    assert stats.telemetry_accounted + stats.telemetry_dropped == 40

            run(burst())


def test_deadline_aware_admission_refuses_what_cannot_finish() -> None:
    from scheduler.policies import RequestInfo, make_policy

    async def go() -> None:
        d = Dispatcher(
            make_policy("total_requests"),
            2,
            1,
            1,
            window_s=0.0,
            max_window=8,
            max_queue=8,
            cooldown_s=1.0,
        )
        d.start()
        try:
            d.times.observe(hold_s=1.0, ttft_s=0.1, tokens=10, max_new_tokens=10)
            held = [await d.acquire(RequestInfo(f"r{i}", None, None, 1)) for i in range(2)]
            now = time.monotonic()
            with pytest.raises(DeadlineRefused, match="expected wait"):
                await d.acquire(RequestInfo("late", None, None, 1), now + 0.3, 0.1)
            waiter = asyncio.ensure_future(d.acquire(RequestInfo("ok", None, None, 1), now + 5))
            await asyncio.sleep(0.01)
            d.release(held[0], RequestInfo("r0", None, None, 1))
            assert await waiter == held[0]
        finally:
            await d.stop()

    run(go())


def test_requests_survive_a_backend_restart_within_their_deadline(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a free port, with nothing listening yet
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, f"http://127.0.0.1:{port}")
    with SchedulerServer(config) as s:

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                calls = [
                    asyncio.ensure_future(client.generate(f"p{i}", max_new_tokens=2, timeout=15))
                    for i in range(5)
                ]
                await asyncio.sleep(1.5)  # SGLang "restarting": every attempt is refused
                assert not any(c.done() for c in calls)
                with EmulatorServer(make_emulator(), port=port):
                    replies = await asyncio.gather(*calls)
                # The instance was down: its ranks were out, so the calls waited for a rank
                # (instead of spending attempts on refused connections) until it came back.
                assert all(r.info.queue_seconds > 1 for r in replies)
                assert (await client.stats()).outcomes["ok"] == 5

        run(go())


def test_the_scheduler_sends_sglangs_api_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    emulator = make_emulator()
    emulator.config = replace(emulator.config, api_key="k3y")
    with EmulatorServer(emulator) as emu:
        with SchedulerServer(write_config(tmp_path, emu.url)) as s:  # no key: 401

            async def refused() -> None:
                async with SchedulerClient(s.target) as client:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await client.generate("hi", max_new_tokens=1, timeout=10)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "401" in err.value.details()

            run(refused())
        monkeypatch.setenv("MOE_SCHEDULER_BACKEND_API_KEY", "k3y")
        with SchedulerServer(write_config(tmp_path, emu.url)) as s:

            async def served() -> None:
                async with SchedulerClient(s.target) as client:
                    reply = await client.generate("hi", max_new_tokens=1, timeout=10)
                    assert reply.info.completion_tokens == 1

            run(served())


def test_a_bug_is_internal_with_its_cause_logged_never_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SchedulerServer(write_config(tmp_path, "http://127.0.0.1:9")) as s:

        def broken(request: object) -> None:
            raise ZeroDivisionError("injected")

        assert s.running is not None
        s.call(lambda: setattr(s.running.core, "validate", broken))  # type: ignore[union-attr]

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await client.generate("hi", max_new_tokens=1, timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as stream:
                    _ = [c async for c in client.generate_stream("hi", timeout=10)]
                for err in (unary, stream):
                    assert err.value.code() == grpc.StatusCode.INTERNAL
                    assert "ZeroDivisionError" in err.value.details()
                assert (await client.stats()).outcomes["internal"] == 2

        run(go())
    assert "injected" in caplog.text


def test_optional_files_may_be_left_empty_but_tls_needs_both(tmp_path: Path) -> None:
    empty = {**LISTEN, "tls_cert": "", "tls_key": "", "admin_token_file": ""}
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", server=empty))
    assert config.server.tls_cert is None and config.server.admin_token_file is None
    half = {**LISTEN, "tls_cert": "server.pem"}
    with pytest.raises(ConfigError, match="tls_cert and server.tls_key go together"):
        load_config(write_config(tmp_path, "http://127.0.0.1:9", server=half))


def test_an_unseen_model_shape_at_production_size() -> None:
    """A JSON model (no preset): 48 layers, MoE every other one, 128 experts, top-1; the
    first MoE layer sends 99.9 % of its tokens to one expert. A 16,384-token prefill chunk
    with routed experts goes through the wire reader and the worker process."""
    import orjson

    from scheduler.accounting import static_dispatch_table
    from scheduler.emulator.expert_location import trivial_location
    from scheduler.model_shape import ModelShape
    from scheduler.placement.topology import Topology
    from scheduler.server.wire import SSEEvents, split_routed
    from scheduler.traces.importers.sglang_generate import encode_routed_experts

    model = ModelShape.from_dict(
        {
            "name": "top1-128",
            "num_hidden_layers": 48,
            "moe_layer_ids": list(range(1, 48, 2)),
            "num_experts": 128,
            "top_k": 1,
            "hidden_size": 2048,
        }
    )
    placement = trivial_location(model, 8, 2)
    ctx = MeasureContext(
        model, Topology(4, 2), placement, static_dispatch_table(placement),
        placement.node_presence(),
    )  # fmt: skip
    tokens = 16_384
    rng = np.random.default_rng(0)
    ids = np.zeros((tokens, model.num_hidden_layers, 1), dtype=np.int32)  # dense rows: 0
    for layer in model.moe_layer_ids:
        ids[:, layer, 0] = rng.integers(0, 128, tokens)
    hot = model.moe_layer_ids[0]
    ids[:, hot, 0] = np.where(rng.random(tokens) < 0.999, 7, ids[:, hot, 0])
    body = orjson.dumps(
        {
            "text": "x" * 100,
            "output_ids": [1],
            "meta_info": {
                "prompt_tokens": tokens,
                "completion_tokens": 1,
                "routed_experts": encode_routed_experts(ids),
            },
        }
    )
    events = SSEEvents(max_event_bytes=len(body) + 1024)
    (event,) = events.feed(b"data: " + body + b"\n\n")
    _, routed = split_routed(event)
    assert routed is not None

    async def go() -> None:
        worker = TelemetryWorker(ctx, "process", max_pending=4)
        try:
            future = worker.submit(routed, 0, tokens)
            assert future is not None
            obs = await future
        finally:
            worker.close()
        assert obs.token_layers == tokens * model.num_moe_layers
        assert obs.prefill.shape == (model.num_moe_layers, 128)
        assert obs.prefill[0, 7] >= 0.998 * tokens and obs.decode.sum() == 0
        assert 0 <= obs.local_fraction <= 1 and obs.inter_node_bytes > 0

    run(go())


def test_a_late_serving_loop_refuses_new_calls(tmp_path: Path) -> None:
    """While the loop runs later than server.max_loop_lag_ms (out of CPU), a new call is
    refused with the reason; once it catches up, calls are admitted again."""
    from scheduler.server.core import SchedulerCore

    config = load_config(
        write_config(
            tmp_path,
            "http://127.0.0.1:9",
            server={"max_loop_lag_ms": 250.0},
            feedback={"worker": "thread"},
        )
    )

    async def go() -> list[str | None]:
        core = SchedulerCore(config)
        seen = []
        for lag_s in (0.3, 0.1):
            core.loop_lag_s = lag_s
            seen.append(core.refuse_new_call())
        core.telemetry.close()
        for backend in core.backends.values():
            await backend.close()
        return seen

    late, caught_up = run(go())
    assert late is not None and "300 ms late" in late and "max_loop_lag_ms" in late
    assert caught_up is None
