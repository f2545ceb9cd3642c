"""The OpenAI-compatible HTTP front door (``[server] openai_listen``, docs/server.md):
``POST /v1/chat/completions`` and ``/v1/completions`` (unary and SSE), ``GET /v1/models``
(and ``/v1/models/{model}``).

Each request goes the way of a gRPC Generate: the same admission (``refuse_new_call``,
one call in progress), prediction, policy, dispatch with the rank pin, accounting of the
routed experts, and exactly one outcome counted once its answer is written (a client that
went away is ``cancelled``). The SGLang answer is relayed as SGLang wrote it: the unary
body, and each streamed chunk as one ``data:`` event, then ``data: [DONE]``; the routed
experts the scheduler asked for are cut out (``sglext.routed_experts`` is ``null``).
Errors are OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status of :data:`~scheduler.server.openai_requests.ERRORS`; an error after a stream
started is a last ``data: {"error": ...}`` event, which the ``openai`` package raises as
an APIError. With an API key configured, every path needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from scheduler.errors import RequestError
from scheduler.server.backend import CHAT, COMPLETIONS
from scheduler.server.core import SchedulerCore, quote
from scheduler.server.openai_requests import ModelNotFound, error_body, parse

log = logging.getLogger("moe_scheduler.server")

CORE_KEY: web.AppKey[SchedulerCore] = web.AppKey("core", SchedulerCore)
#: Largest request body (a prompt at server.max_prompt_chars, JSON-escaped, fits).
MAX_BODY_BYTES = 64 << 20
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
#: The server.max_id_chars bound applies to the X-Request-Id header too (via validate).
REQUEST_ID_HEADER = "X-Request-Id"
#: Seconds the client will wait: the request's deadline, as a gRPC call's (without it,
#: backend.request_timeout_s bounds it and the queue cannot refuse it early).
TIMEOUT_HEADER = "X-Request-Timeout"


def _deadline(request: web.Request) -> float | None:
    """The absolute deadline of :data:`TIMEOUT_HEADER`, or None; RequestError if bad."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise RequestError("invalid", f"{TIMEOUT_HEADER} must be seconds > 0, got {quote(value)}")
    return time.monotonic() + seconds


def _error(error: RequestError | str, message: str = "") -> web.Response:
    status, body = error_body(error, message)
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    key = request.app[CORE_KEY].openai_api_key
    if key:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return _error("unauthorized", "Incorrect API key provided (Authorization: Bearer)")
    response: web.StreamResponse = await handler(request)
    return response


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "sglang"}


async def models(request: web.Request) -> web.Response:
    core = request.app[CORE_KEY]
    created = int(time.time() - (time.monotonic() - core.started))
    cards = [_model_card(name, created) for name in core.model_names()]
    return web.json_response({"object": "list", "data": cards}, dumps=_dumps)


async def model(request: web.Request) -> web.Response:
    core, name = request.app[CORE_KEY], request.match_info["model"]
    if name not in core.model_names():
        return _error(ModelNotFound(f"the model {quote(name)} does not exist"))
    created = int(time.time() - (time.monotonic() - core.started))
    return web.json_response(_model_card(name, created), dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, COMPLETIONS)


async def _serve(request: web.Request, endpoint: str) -> web.StreamResponse:
    core = request.app[CORE_KEY]
    refused = core.refuse_new_call()
    if refused is not None:
        core.count("overloaded")
        return _error("overloaded", f"the scheduler is overloaded: {refused}")
    core.in_progress += 1
    core.metrics.in_progress.inc()
    outcome = "internal"
    try:
        outcome, response = await _answer(request, core, endpoint)
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        outcome = "cancelled"
        raise
    except Exception as e:  # a bug: INTERNAL with its cause logged, never a bare 500
        log.exception("OpenAI request failed: %s", e)
        return _error("internal", f"internal error: {type(e).__name__}")
    finally:
        core.in_progress -= 1
        core.metrics.in_progress.dec()
        core.count(outcome)


async def _answer(
    request: web.Request, core: SchedulerCore, endpoint: str
) -> tuple[str, web.StreamResponse]:
    """(the call's outcome, its response), the response written when the outcome is ok."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        return "invalid", _error("invalid", f"the request body is not JSON ({e})")
    except web.HTTPRequestEntityTooLarge:
        return "invalid", _error("invalid", f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        deadline = _deadline(request)
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        job = parse(endpoint, body, core.config, core.cluster, core.model_names(), request_id)
    except RequestError as e:
        log.info("OpenAI request: %s: %s", e.outcome, e)
        return e.outcome, _error(e)
    if not job.stream:
        try:
            out = await core.run(job.job, deadline, None)
        except RequestError as e:
            log.info("request %s: %s: %s", job.job.request_id, e.outcome, e)
            return e.outcome, _error(e)
        response = web.Response(body=out.body, content_type="application/json")
        await response.prepare(request)
        await response.write_eof()
        return "ok", response
    stream = web.StreamResponse(headers=_SSE_HEADERS)

    async def relay(text: str, event: bytes | None) -> None:
        if event is None:
            return
        if not stream.prepared:
            await stream.prepare(request)
        await stream.write(b"data: " + event + b"\n\n")

    try:
        await core.run(job.job, deadline, relay)
        outcome = "ok"
    except RequestError as e:
        log.info("request %s: %s: %s", job.job.request_id, e.outcome, e)
        if not stream.prepared:
            return e.outcome, _error(e)
        await stream.write(b"data: " + orjson.dumps(error_body(e)[1]) + b"\n\n")
        outcome = e.outcome
    if not stream.prepared:
        await stream.prepare(request)
    await stream.write(b"data: [DONE]\n\n")
    await stream.write_eof()
    return outcome, stream


def make_app(core: SchedulerCore) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_auth])
    app[CORE_KEY] = core
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    return app


async def start_openai(core: SchedulerCore, host: str, port: int) -> tuple[web.AppRunner, str]:
    """The listener, started; (its runner, its URL). OSError if it cannot bind."""
    # handler_cancellation: a client that goes away cancels its request (and its slot).
    runner = web.AppRunner(make_app(core), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"
