"""The HTTP layer: SGLang's endpoints over aiohttp around :class:`.core.Emulator`.

Endpoints: ``POST /generate`` (JSON, or SSE with ``"stream": true``), ``GET /health``
(and ``/health_generate``), ``GET /server_info`` (and ``/get_server_info``),
``GET /get_model_info``, ``GET /v1/loads``; the failure switch ``GET /admin/ranks``,
``POST /admin/ranks/{rank}`` with ``{"mode": "ok" | "fail" | "hang"}``; and
``GET|POST /admin/config`` with ``{"time_scale": x}`` (wall seconds per modelled second).
Errors are ``{"error": {"message": ...}}`` with status 400 (bad request) or 503 (rank not
active, shutting down), as SGLang answers them. With an API key (``EmulatorConfig.api_key``,
SGLang's ``--api-key``) every path but ``/health*``, ``/ready*`` and ``/metrics*`` needs
``Authorization: Bearer KEY`` and is otherwise answered 401 ``{"error":"Unauthorized"}``,
``/admin`` included (:mod:`.auth`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from scheduler.emulator.auth import UNAUTHORIZED_BODY, UNAUTHORIZED_STATUS, is_authorized
from scheduler.emulator.core import SGLANG_API_VERSION, BadRequest, Emulator, Plan
from scheduler.emulator.ranks import RankUnavailable

#: Largest request body accepted (long prompts as text or token ids).
MAX_BODY_BYTES = 64 << 20
EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("emulator", Emulator)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _error(message: str, status: int) -> web.Response:
    return _json({"error": {"message": message}}, status)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _run_for(emulator: Emulator, rank: int, modelled_s: float) -> None:
    """Let ``modelled_s`` modelled seconds pass for a request running on ``rank``.

    Wall time is ``modelled_s * time_scale``. A mode change or a new time scale wakes
    the request early: it then passes the rank's checkpoint (failing or hanging there)
    and spends the rest of its modelled time at the current scale.
    """
    loop = asyncio.get_running_loop()
    remaining = modelled_s
    while remaining > 0 and emulator.time_scale > 0:
        scale = emulator.time_scale
        started = loop.time()
        if not await emulator.pool.wait(rank, remaining * scale):
            break
        remaining -= (loop.time() - started) / scale
        await emulator.pool.checkpoint(rank)
    await emulator.pool.checkpoint(rank)


# --------------------------------------------------------------------------- /generate


async def generate(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    started = time.perf_counter()
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(f"the request body is not JSON ({e})", 400)
    try:
        plan = emulator.plan(body)
        await emulator.pool.admit(plan.rank, plan.ticket)
    except BadRequest as e:
        return _error(str(e), 400)
    except RankUnavailable as e:
        return _error(str(e), 503)
    generated = 0
    try:
        modelled = emulator.timing(plan)
        if plan.request.stream:
            response, generated = await _stream(request, emulator, plan, modelled, started)
            return response
        prefill, per_token = modelled
        await _run_for(emulator, plan.rank, prefill + plan.completion_tokens * per_token)
        generated = plan.completion_tokens
    except RankUnavailable as e:
        return _error(str(e), 503)
    finally:
        emulator.pool.release(plan.rank, plan.ticket, generated)
    return _json(emulator.response(plan, time.perf_counter() - started, modelled))


async def _stream(
    request: web.Request,
    emulator: Emulator,
    plan: Plan,
    modelled: tuple[float, float],
    started: float,
) -> tuple[web.StreamResponse, int]:
    """SSE: one ``data: {...}`` chunk per generated token, then ``data: [DONE]``; the
    last chunk has the finish reason and ``routed_experts``. Returns the response and
    the number of tokens sent."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    prefill, per_token = modelled
    sent = 0
    error: dict[str, Any] | None = None
    try:
        for done in range(1, plan.completion_tokens + 1) if plan.completion_tokens else [0]:
            await _run_for(emulator, plan.rank, prefill if done <= 1 else per_token)
            last = done == plan.completion_tokens
            chunk = emulator.stream_chunk(
                plan,
                done,
                sent,
                e2e_latency=time.perf_counter() - started if last else None,
                modelled=modelled if last else None,
            )
            await response.write(_sse(chunk))
            sent = done
    except RankUnavailable as e:
        error = {"error": {"message": str(e)}}
    except ConnectionError:  # the client went away: nothing more to send
        return response, sent
    try:
        if error is not None:
            await response.write(_sse(error))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        pass
    return response, sent


# --------------------------------------------------------------------------- the rest


async def health(request: web.Request) -> web.Response:
    if request.app[EMULATOR_KEY].closing:
        return web.Response(status=503)
    return web.Response(status=200)


async def server_info(request: web.Request) -> web.Response:
    return _json(request.app[EMULATOR_KEY].server_info())


async def model_info(request: web.Request) -> web.Response:
    name = request.app[EMULATOR_KEY].model.name
    return _json({"model_path": name, "tokenizer_path": None, "is_generation": True})


async def loads(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    query = request.query
    if query.get("format", "json") != "json":
        return _error("the emulator serves /v1/loads only as format=json", 400)
    include = {s.strip() for s in query["include"].split(",")} if "include" in query else None
    valid = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
    if include is not None and not include <= valid:
        return _error(f"Invalid include sections: {sorted(include - valid)}", 400)
    entries = emulator.pool.loads(include)
    if "dp_rank" in query:
        try:
            rank = int(query["dp_rank"])
        except ValueError:
            return _error("dp_rank must be an integer", 400)
        if not 0 <= rank < len(entries):
            return _error(f"dp_rank {rank} is out of range [0, {len(entries)})", 400)
        entries = [entries[rank]]
    return _json(
        {
            "timestamp": datetime.now(UTC).isoformat(),
            "version": SGLANG_API_VERSION,
            "accelerator": None,
            "num_accelerators": 1,
            "loads": entries,
        }
    )


async def admin_ranks(request: web.Request) -> web.Response:
    return _json({"modes": request.app[EMULATOR_KEY].pool.modes()})


async def admin_set_rank(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    try:
        rank = int(request.match_info["rank"])
        body = json.loads(await request.read())
        mode = body.get("mode") if isinstance(body, dict) else None
        emulator.pool.set_mode(rank, str(mode))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return _error(str(e), 400)
    return _json({"dp_rank": rank, "mode": mode})


async def admin_config(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    if request.method == "POST":
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            return _error(f"the request body is not JSON ({e})", 400)
        scale = body.get("time_scale") if isinstance(body, dict) else None
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 0:
            return _error(f"time_scale must be a number >= 0, got {scale!r}", 400)
        emulator.time_scale = float(scale)
        emulator.pool.wake()  # running requests continue at the new scale
    return _json({"time_scale": emulator.time_scale})


def api_key_middleware(api_key: str) -> Middleware:
    """SGLang's ``--api-key`` check in front of every route, unknown ones included (so a
    wrong path without the key is 401, not 404, as in SGLang)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if not is_authorized(request.method, request.path, authorization, api_key):
            return _json(UNAUTHORIZED_BODY, UNAUTHORIZED_STATUS)
        return await handler(request)

    return check


def create_app(emulator: Emulator) -> web.Application:
    api_key = emulator.config.api_key
    middlewares = [api_key_middleware(api_key)] if api_key is not None else []
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app[EMULATOR_KEY] = emulator
    app.router.add_post("/generate", generate)
    for path in ("/health", "/health_generate"):
        app.router.add_get(path, health)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/v1/loads", loads)
    app.router.add_get("/admin/ranks", admin_ranks)
    app.router.add_post("/admin/ranks/{rank}", admin_set_rank)
    app.router.add_get("/admin/config", admin_config)
    app.router.add_post("/admin/config", admin_config)
    return app


async def serve(
    emulator: Emulator,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[str, int], None] | None = None,
    shutdown_grace_s: float = 5.0,
) -> None:
    """Serve until ``stop`` is set, then shut down gracefully.

    ``on_ready(host, port)`` is called once the socket is bound (port 0 gets a free port).
    On stop: /health turns 503, queued and hung requests are refused (503), running ones
    get ``shutdown_grace_s`` seconds to finish before they are cancelled.
    """
    runner = web.AppRunner(
        create_app(emulator),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_grace_s,
        handler_cancellation=True,  # a client that goes away aborts its request, as in SGLang
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        if on_ready is not None:
            on_ready(str(bound[0]), int(bound[1]))
        await stop.wait()
        emulator.closing = True
        emulator.pool.close()
    finally:
        await runner.cleanup()
