"""Start and stop a scheduler server: gRPC (the API, health, reflection), the Prometheus
metrics endpoint and the optional OpenAI-compatible listener on one asyncio loop (uvloop
when installed); SIGHUP reloads the configuration. TLS and the admission bounds are set
here (docs/server.md)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from scheduler.errors import ConfigError
from scheduler.server.config import ServerConfig
from scheduler.server.core import SchedulerCore
from scheduler.server.openai_http import start_openai
from scheduler.server.service import SERVICE_NAME, SchedulerService, handlers

log = logging.getLogger("moe_scheduler.server")

#: gRPC message size limit (prompts are bounded by server.max_prompt_* well below it).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Calls beyond the request path's own bound kept for statistics and admin RPCs.
ADMIN_HEADROOM_RPCS = 256
#: Seconds grpc-core may hold a call this loop has not taken yet (its default is 30).
UNREQUESTED_WAIT_S = 3600


@dataclass
class RunningServer:
    core: SchedulerCore
    grpc_server: grpc.aio.Server
    health: health_aio.HealthServicer
    metrics_runner: web.AppRunner
    grpc_address: str
    metrics_url: str
    #: The OpenAI-compatible listener (server.openai_listen), when configured.
    openai_runner: web.AppRunner | None = None
    openai_url: str = ""

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, let running ones finish for ``grace_s``, then close."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_s)
        if self.openai_runner is not None:
            await self.openai_runner.shutdown()
            await self.openai_runner.cleanup()
        await self.core.stop()
        await self.metrics_runner.cleanup()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def grpc_call_bound(core: SchedulerCore) -> int:
    """grpc.aio's own bound on open calls, a memory backstop far above the scheduler's
    (``server.max_concurrent_rpcs``, refused with RESOURCE_EXHAUSTED and counted): past
    it grpc.aio stops accepting calls, which then wait in grpc-core and end CANCELLED, so
    only calls that never send their request (a flood of empty streams) should reach it."""
    return 4 * core.max_in_progress() + ADMIN_HEADROOM_RPCS


def streams_per_connection(core: SchedulerCore) -> int:
    """HTTP/2 streams one connection may open (``server.max_streams_per_connection``;
    0: the admission bound plus admin room). grpc-core refuses a stream past it with
    REFUSED_STREAM before any handler runs, so by default one connection can reach the
    scheduler's own admission, which refuses with RESOURCE_EXHAUSTED and counts it."""
    return core.config.server.max_streams_per_connection or (
        core.max_in_progress() + ADMIN_HEADROOM_RPCS
    )


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"server.{key} {path}: {e}") from e


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from server.tls_* (None: plaintext)."""
    s = config.server
    if s.tls_cert is None or s.tls_key is None:
        return None
    pair = (_read(s.tls_key, "tls_key"), _read(s.tls_cert, "tls_cert"))
    if s.tls_client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read(s.tls_client_ca, "tls_client_ca"), require_client_auth=True
    )


async def start_server(config: ServerConfig) -> RunningServer:
    """Everything up and listening; ConfigError if a port cannot be bound."""
    core = SchedulerCore(config)
    credentials = server_credentials(config)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", streams_per_connection(core)),
            # Calls grpc-core holds before this loop takes them: by default it rejects
            # them at random past 1,000 and cancels them after 30 s, both as CANCELLED,
            # which the client did not do. Let them wait (bounded) for the handler, whose
            # admission answers each with its own status.
            ("grpc.server.max_pending_requests", grpc_call_bound(core)),
            ("grpc.server.max_pending_requests_hard_limit", grpc_call_bound(core)),
            ("grpc.server_max_unrequested_time_in_server", UNREQUESTED_WAIT_S),
        ],
        maximum_concurrent_rpcs=grpc_call_bound(core),
    )
    server.add_generic_rpc_handlers((handlers(SchedulerService(core)),))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    host, _ = _split(config.server.listen)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.server.listen)
        else:
            port = server.add_secure_port(config.server.listen, credentials)
    except RuntimeError as e:
        raise ConfigError(f"server.listen {config.server.listen}: cannot bind ({e})") from e
    if port == 0:
        raise ConfigError(f"server.listen {config.server.listen}: cannot bind")

    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(core.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    m_host, m_port = _split(config.server.metrics_listen)
    site = web.TCPSite(runner, m_host, m_port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(f"server.metrics_listen {config.server.metrics_listen}: {e}") from e
    bound = runner.addresses[0][1]
    openai_runner, openai_url = None, ""
    if config.server.openai_listen:
        o_host, o_port = _split(config.server.openai_listen)
        try:
            openai_runner, openai_url = await start_openai(core, o_host, o_port)
        except OSError as e:
            await runner.cleanup()
            raise ConfigError(f"server.openai_listen {config.server.openai_listen}: {e}") from e
    await server.start()
    running = RunningServer(
        core,
        server,
        health,
        runner,
        f"{host}:{port}",
        f"http://{m_host}:{bound}/metrics",
        openai_runner,
        openai_url,
    )
    await running.set_serving(False)
    loop = asyncio.get_running_loop()

    def on_health(serving: bool) -> None:
        loop.create_task(running.set_serving(serving))

    core.on_health = on_health
    await core.start()
    return running


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's own loop."""
    import os

    try:
        import uvloop

        if os.environ.get("NOUV"):
            raise ImportError
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def serve_forever(
    config: ServerConfig, on_ready: Callable[[RunningServer], None], grace_s: float = 5.0
) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the configuration file."""
    running = await start_server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[tuple[bool, str]]] = set()

    def reload() -> None:
        task = loop.create_task(running.core.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    on_ready(running)
    try:
        await stop.wait()
    finally:
        log.info("shutting down (grace %.0f s)", grace_s)
        await running.stop(grace_s)
