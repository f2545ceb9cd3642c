"""The HTTP layer: SGLang's endpoints over aiohttp around :class:`.core.Emulator`.

Endpoints: ``POST|PUT /generate`` (JSON, or SSE with ``"stream": true``), per role:
mixed, prefill (one token after the decode peer took the KV) or decode (KV fetched from
the prefill's bootstrap server, then the completion); ``GET /health`` (and
``/health_generate``), ``GET /ready``, ``GET /server_info`` (and ``/get_server_info``),
``GET /model_info`` (and ``/get_model_info``), ``GET /v1/models[/{model}]``,
``GET /v1/loads``; ``POST /v1/chat/completions`` and ``POST /v1/completions`` (unary or
SSE), which take /generate's path (rank, timing, routing, PD role) with the OpenAI body
read and the answer written by :mod:`.openai_api` (a :class:`_Format` per endpoint); and
the emulator's ``/admin`` endpoints (:mod:`.admin`).

Errors are SGLang's: on /generate ``{"error": {"message": ...}}`` with 400 for a bad
request (the OpenAI endpoints: its ``ErrorResponse``, below, type ``BadRequestError``, or
``Bad Request`` where FastAPI's validation would refuse the body); a KV
transfer failure (PD) is 500 with SGLang's ``ErrorResponse`` body ``{"object": "error",
"message", "type": "500", "param": null, "code": 500}`` (in a stream: a last chunk whose
``finish_reason`` is ``{"type": "abort", "message", "status_code": 500, ...}``; an
OpenAI stream sends ``{"error": ErrorResponse}`` instead). Where
SGLang's DP controller would raise (a request pinned to a failed rank), the instance
dies instead of answering (:mod:`.instance`). With an API key every path but
``/health*``, ``/ready*`` and ``/metrics*`` needs ``Authorization: Bearer KEY``
(:mod:`.auth`), ``/admin`` included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from scheduler.emulator.admin import add_admin_routes
from scheduler.emulator.auth import UNAUTHORIZED_BODY, UNAUTHORIZED_STATUS, is_authorized
from scheduler.emulator.bootstrap import fetch_kv
from scheduler.emulator.core import BadRequest, Emulator, Plan
from scheduler.emulator.generate_request import expected_prefill_rank
from scheduler.emulator.info import DISAGGREGATION_MODE, model_info, server_info
from scheduler.emulator.instance import Instance, vanish
from scheduler.emulator.kv_rooms import KvTransferFailed
from scheduler.emulator.openai_api import (
    DP_RANK_HEADER,
    OpenAIFormat,
    OpenAIRefusal,
    OpenAIRequest,
    parse_chat,
    parse_completion,
)
from scheduler.emulator.ranks import ControllerCrash, RankPool, RankUnavailable
from scheduler.emulator.web_common import (
    EMULATOR_KEY,
    INSTANCE_KEY,
    error_response,
    json_response,
)

#: Largest request body accepted (long prompts as text or token ids).
MAX_BODY_BYTES = 64 << 20
SESSION_KEY: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _Abort(Exception):
    """A request SGLang aborts with a status (PD: KV transfer failures, 500)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


async def _run_for(emulator: Emulator, pool: RankPool, rank: int, modelled_s: float) -> None:
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
        if not await pool.wait(rank, remaining * scale):
            break
        remaining -= (loop.time() - started) / scale
        await pool.checkpoint(rank)
    await pool.checkpoint(rank)


class _Format(Protocol):
    """How an endpoint writes what the shared path produces: /generate's answer and
    stream chunks (``Emulator.response``, ``stream_chunk``, ``abort_chunk``) as they
    are (:class:`_Native`), or as SGLang's OpenAI layer translates them
    (:class:`.openai_api.OpenAIFormat`)."""

    def answer(self, content: dict[str, Any]) -> dict[str, Any]: ...
    def chunks(self, content: dict[str, Any]) -> list[bytes]: ...
    def end(self) -> list[bytes]: ...
    def refused(self, message: str, status: int) -> dict[str, Any]: ...
    def stream_error(self, message: str, status: int) -> bytes: ...


class _Native:
    """/generate: the native answer and chunks; errors ``{"error": {"message": ...}}``."""

    def answer(self, content: dict[str, Any]) -> dict[str, Any]:
        return content

    def chunks(self, content: dict[str, Any]) -> list[bytes]:
        return [_sse(content)]

    def end(self) -> list[bytes]:
        return []

    def refused(self, message: str, status: int) -> dict[str, Any]:
        return {"error": {"message": message}}

    def stream_error(self, message: str, status: int) -> bytes:
        return _sse({"error": {"message": message}})


_NATIVE = _Native()


@dataclass
class _Served:
    """One request on its way: how its answer is written, and what the request log
    records of it."""

    format: _Format = field(default=_NATIVE)
    plan: Plan | None = None
    outcome: str = "error"
    generated: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _Parsed:
    """A request body read by its endpoint: the /generate body it amounts to, and what
    :meth:`Emulator.plan` and the answer need besides."""

    body: Any
    format: _Format
    class_text: str | None = None
    pinned_field: str | None = None


class _Refused(Exception):
    """A body its endpoint refuses before planning: ``body`` with ``status``."""

    def __init__(self, message: str, body: dict[str, Any], status: int) -> None:
        super().__init__(message)
        self.body = body
        self.status = status


def _read_generate(request: web.Request, raw: bytes, emulator: Emulator) -> _Parsed:
    try:
        return _Parsed(json.loads(raw), _NATIVE)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        message = f"the request body is not JSON ({e})"
        raise _Refused(message, _NATIVE.refused(message, 400), 400) from e


def _openai_reader(
    parse: Callable[[bytes, str, str | None, Any, str], OpenAIRequest],
) -> Callable[[web.Request, bytes, Emulator], _Parsed]:
    def read(request: web.Request, raw: bytes, emulator: Emulator) -> _Parsed:
        headers = request.headers
        try:
            r = parse(
                raw,
                headers.get("Content-Type", ""),
                headers.get(DP_RANK_HEADER),
                emulator.version,
                emulator.model.name,
            )
        except OpenAIRefusal as e:
            raise _Refused(str(e), e.body, e.status) from e
        incremental = emulator.config.incremental_streaming_output
        fmt = OpenAIFormat(r, int(time.time()), incremental)
        return _Parsed(r.generate_body, fmt, r.class_text, r.pinned_field)

    return read


# --------------------------------------------------------------------------- handlers


async def generate(request: web.Request) -> web.StreamResponse:
    """``/generate``."""
    return await _serve(request, _read_generate)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``/v1/chat/completions``: /generate's path, OpenAI's request and response."""
    return await _serve(request, _openai_reader(parse_chat))


async def completions(request: web.Request) -> web.StreamResponse:
    """``/v1/completions``: /generate's path, OpenAI's request and response."""
    return await _serve(request, _openai_reader(parse_completion))


async def _serve(
    request: web.Request, read: Callable[[web.Request, bytes, Emulator], _Parsed]
) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    instance = request.app[INSTANCE_KEY]
    served = _Served()
    try:
        return await _generate(request, read, emulator, instance, emulator.pool, served)
    except asyncio.CancelledError:  # the client went away, or the instance died
        served.outcome = "error" if instance.dead else "cancelled"
        served.error = served.error or instance.reason or "the client went away"
        raise
    finally:
        plan = served.plan
        r = plan.request if plan is not None else None
        emulator.requests.add(
            plan.request_id if plan is not None else None,
            plan.rank if plan is not None else None,
            r.pinned_field if r is not None else None,
            (r.bootstrap_room, r.bootstrap_host, r.bootstrap_port) if r else (None, None, None),
            r.disagg_prefill_dp_rank if r is not None else None,
            served.outcome,
            served.generated,
            served.error,
        )


async def _generate(
    request: web.Request,
    read: Callable[[web.Request, bytes, Emulator], _Parsed],
    emulator: Emulator,
    instance: Instance,
    pool: RankPool,
    served: _Served,
) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        parsed = read(request, await request.read(), emulator)
        served.format = parsed.format
        plan = emulator.plan(
            parsed.body, class_text=parsed.class_text, pinned_field=parsed.pinned_field
        )
    except _Refused as e:
        served.error = str(e)
        return json_response(e.body, e.status)
    except BadRequest as e:
        served.error = str(e)
        return json_response(served.format.refused(served.error, 400), 400)
    except ControllerCrash as e:  # SGLang's DP controller raises: the server goes down
        served.error = str(e)
        instance.die(f"SGLang's DP controller would raise: {e}", e.restart_after_s)
        return await vanish(request)
    served.plan = plan
    try:
        if emulator.role == "prefill":
            response = await _prefill(request, emulator, pool, plan, started, served)
        elif emulator.role == "decode":
            response = await _decode(request, emulator, pool, plan, started, served)
        else:
            response = await _mixed(request, emulator, pool, plan, started, served)
    except RankUnavailable as e:  # shutting down, or the rank failed under the request
        served.error = str(e)
        return json_response(served.format.refused(str(e), 503), 503)
    except _Abort as e:  # SGLang's ErrorResponse, as its HTTPException handler sends it
        served.error, served.generated = str(e), 0
        body = {"object": "error", "message": str(e), "type": str(e.status), "param": None}
        return json_response({**body, "code": e.status}, e.status)
    if served.error is None:
        served.outcome = "ok"
    return response


async def _mixed(
    request: web.Request,
    emulator: Emulator,
    pool: RankPool,
    plan: Plan,
    started: float,
    served: _Served,
) -> web.StreamResponse:
    """A mixed instance: prefill then decode on one rank."""
    await pool.admit(plan.rank, plan.ticket)
    prefill, per_token = emulator.timing(plan)
    pool.record_prefill(plan.rank, plan.prompt_tokens, prefill)
    steps = plan.completion_tokens  # (a unary answer waits one step per token after prefill)
    return await _tokens(request, emulator, pool, plan, started, served, prefill, per_token, steps)


async def _tokens(
    request: web.Request,
    emulator: Emulator,
    pool: RankPool,
    plan: Plan,
    started: float,
    served: _Served,
    first_s: float,
    per_token: float,
    unary_steps: int,
) -> web.StreamResponse:
    """The tokens of an admitted request: the first after ``first_s`` modelled seconds
    (a prefill; 0 on a decode instance, whose KV came from its prefill peer), then one
    per ``per_token``; streamed, or answered after ``first_s`` and ``unary_steps`` steps.
    Releases the rank's slot."""
    modelled = (first_s, per_token)
    batch = pool.running_count(plan.rank)
    steps = max(plan.completion_tokens - 1, 0)
    try:
        if plan.request.stream:
            delays = [first_s] + [per_token] * steps
            return await _stream(request, emulator, pool, plan, delays, modelled, started, served)
        await _run_for(emulator, pool, plan.rank, first_s + unary_steps * per_token)
        served.generated = plan.completion_tokens
    finally:
        pool.record_decode(plan.rank, max(served.generated - 1, 0), batch, per_token)
        pool.release(plan.rank, plan.ticket, served.generated)
    answer = emulator.response(plan, time.perf_counter() - started, modelled)
    return json_response(served.format.answer(answer))


async def _prefill(
    request: web.Request,
    emulator: Emulator,
    pool: RankPool,
    plan: Plan,
    started: float,
    served: _Served,
) -> web.StreamResponse:
    """A prefill instance: the prompt's forward pass on the rank, then the room is
    published to the bootstrap server and the request waits (bounded) until its decode
    peer fetched it; the answer is SGLang's prefill answer (one token)."""
    room = plan.request.bootstrap_room
    assert room is not None  # checked by Emulator.plan
    rooms = emulator.rooms
    try:
        rooms.open(room)
    except KvTransferFailed as e:
        raise _Abort(_prefill_failure(plan, str(e))) from e
    conflict = emulator.follow_room_conflict(plan)
    if conflict is not None:  # SGLang fails the KV sender before any prefill
        rooms.fail(room, conflict)
        rooms.close(room)
        failure = _prefill_failure(plan, f"KVTransferError(bootstrap_room={room}): {conflict}")
        if plan.request.stream:
            served.error = failure
            return await _stream(request, emulator, pool, plan, [], (0.0, 0.0), 0.0, served)
        raise _Abort(failure)
    try:
        await pool.admit(plan.rank, plan.ticket)
        try:
            prefill, per_token = modelled = emulator.timing(plan)
            await _run_for(emulator, pool, plan.rank, prefill)
            pool.record_prefill(plan.rank, plan.prompt_tokens, prefill)
            served.generated = plan.completion_tokens
        finally:
            pool.release(plan.rank, plan.ticket, served.generated)
        rooms.publish(room, plan.rank, plan.prompt_tokens)
        pool.kv_in_flight(plan.rank, 1)
        try:
            await rooms.wait_fetched(room, emulator.config.kv_timeout_s)
        except KvTransferFailed as e:
            failure = _prefill_failure(plan, str(e))
            if plan.request.stream:
                served.error = failure
                return await _stream(request, emulator, pool, plan, [], modelled, started, served)
            raise _Abort(failure) from e
        finally:
            pool.kv_in_flight(plan.rank, -1)
    finally:
        rooms.close(room)
    if plan.request.stream:
        return await _stream(request, emulator, pool, plan, [0.0], modelled, started, served)
    answer = emulator.response(plan, time.perf_counter() - started, modelled)
    return json_response(served.format.answer(answer))


def _prefill_failure(plan: Plan, reason: str) -> str:
    """SGLang's ``handle_bootstrap_failure`` message (status 500)."""
    return (
        f"Prefill bootstrap failed for request rank={plan.rank} req.rid={plan.request_id!r} "
        f"req.bootstrap_room={plan.request.bootstrap_room} with exception {reason}"
    )


async def _decode(
    request: web.Request,
    emulator: Emulator,
    pool: RankPool,
    plan: Plan,
    started: float,
    served: _Served,
) -> web.StreamResponse:
    """A decode instance: fetch the KV from the prefill's bootstrap server (long poll,
    bounded), then generate on the rank with decode timing only: the first token came
    with the KV, each further one takes a decode step."""
    r = plan.request
    assert r.bootstrap_host is not None and r.bootstrap_port is not None
    assert r.bootstrap_room is not None
    session = request.app[SESSION_KEY]
    hint = expected_prefill_rank(r, emulator.version)
    pool.expect_kv(plan.rank, plan.prompt_tokens)
    try:
        handoff = await fetch_kv(
            session,
            r.bootstrap_host,
            r.bootstrap_port,
            r.bootstrap_room,
            emulator.config.kv_timeout_s,
            hint,
        )
        if hint is not None and hint != handoff.prefill_dp_rank:  # a bootstrap that did not check
            raise KvTransferFailed(
                f"the KV is on prefill DP rank {handoff.prefill_dp_rank}, not on {hint}"
            )
    except KvTransferFailed as e:
        failure = (
            f"Decode transfer failed for request rank={plan.rank} "
            f"decode_req.req.rid={plan.request_id!r} decode_req.req.bootstrap_room="
            f"{r.bootstrap_room} with exception KVTransferError(bootstrap_room="
            f"{r.bootstrap_room}): {e}"
        )
        if r.stream:
            served.error = failure
            return await _stream(request, emulator, pool, plan, [], (0.0, 0.0), started, served)
        raise _Abort(failure) from e
    finally:
        pool.expect_kv(plan.rank, plan.prompt_tokens, arrived=True)
    if r.disagg_prefill_dp_rank is not None:
        emulator.requests.honoured(plan.rank)
    await pool.admit(plan.rank, plan.ticket)
    _, per_token = emulator.timing(plan)
    steps = max(plan.completion_tokens - 1, 0)  # the first token came with the KV
    return await _tokens(request, emulator, pool, plan, started, served, 0.0, per_token, steps)


async def _stream(
    request: web.Request,
    emulator: Emulator,
    pool: RankPool,
    plan: Plan,
    delays: list[float],
    modelled: tuple[float, float],
    started: float,
    served: _Served,
) -> web.StreamResponse:
    """SSE: one native chunk per generated token, each after its modelled delay
    (``delays``, one per chunk), written by ``served.format`` (the chunk itself, or its
    OpenAI events), then the format's closing events and ``data: [DONE]``; the last
    native chunk has the finish reason and ``routed_experts``. With ``served.error`` set
    (a PD abort), a single abort chunk as SGLang streams it. Counts the tokens sent in
    ``served.generated``."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    fmt = served.format
    error: bytes | None = None
    sent = 0
    try:
        await response.prepare(request)
        if served.error is not None:
            served.generated = 0  # nothing reaches the client
            for event in fmt.chunks(emulator.abort_chunk(plan, served.error, 500)):
                await response.write(event)
        for done, delay in _chunks(plan, delays):
            if delay > 0:  # (a token that came with the KV, or the prefill's after it)
                await _run_for(emulator, pool, plan.rank, delay)
            last = done == plan.completion_tokens
            chunk = emulator.stream_chunk(
                plan,
                done,
                sent,
                e2e_latency=time.perf_counter() - started if last else None,
                modelled=modelled if last else None,
            )
            for event in fmt.chunks(chunk):
                await response.write(event)
            sent = served.generated = done
    except RankUnavailable as e:
        error = fmt.stream_error(str(e), 503)
        served.error = str(e)
    except ConnectionError:  # the client went away: nothing more to send
        served.outcome, served.error = "cancelled", "the client went away"
        return response
    try:
        if error is not None:  # (SGLang's OpenAI stream ends at an error too)
            await response.write(error)
        else:
            for event in fmt.end():
                await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        pass
    return response


def _chunks(plan: Plan, delays: list[float]) -> list[tuple[int, float]]:
    """(tokens done, delay before the chunk): one chunk per token, or one chunk of no
    token for a request of zero tokens; none when ``delays`` is empty (an abort)."""
    if not delays:
        return []
    if plan.completion_tokens == 0:
        return [(0, delays[0])]
    return list(zip(range(1, plan.completion_tokens + 1), delays, strict=True))


# --------------------------------------------------------------------------- the rest


async def health(request: web.Request) -> web.Response:
    if request.app[EMULATOR_KEY].closing:
        return web.Response(status=503)
    return web.Response(status=200)


async def server_info_handler(request: web.Request) -> web.Response:
    return json_response(server_info(request.app[EMULATOR_KEY]))


async def model_info_handler(request: web.Request) -> web.Response:
    return json_response(model_info(request.app[EMULATOR_KEY]))


def _model_card(emulator: Emulator, created: int) -> dict[str, Any]:
    name = emulator.model.name
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "sglang",
        "root": name,
        "parent": None,
        "max_model_len": None,  # the emulator has no context length
    }


async def models(request: web.Request) -> web.Response:
    """``/v1/models``: SGLang's OpenAI ``ModelList`` with the served model's card."""
    card = _model_card(request.app[EMULATOR_KEY], int(time.time()))
    return json_response({"object": "list", "data": [card]})


async def model_card(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    model = request.match_info["model"]
    if model != emulator.model.name:
        return json_response(
            {
                "error": {
                    "message": f"The model '{model}' does not exist",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            },
            404,
        )
    return json_response(_model_card(emulator, int(time.time())))


async def loads(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    query = request.query
    if query.get("format", "json") != "json":
        return error_response("the emulator serves /v1/loads only as format=json", 400)
    include = {s.strip() for s in query["include"].split(",")} if "include" in query else None
    valid = {"core", "memory", "spec", "lora", "disagg", "queues", "all"}
    if include is not None and not include <= valid:
        return error_response(
            f"Invalid include sections: {include - valid}. Valid options: {sorted(valid)}", 400
        )
    entries = emulator.pool.loads(include, DISAGGREGATION_MODE[emulator.role])
    if "dp_rank" in query:
        try:
            rank = int(query["dp_rank"])
        except ValueError:
            return error_response("dp_rank must be an integer", 400)
        # SGLang: a rank outside [0, ranks) has no snapshot, so the list is empty
        entries = [entries[rank]] if 0 <= rank < len(entries) else []
    return json_response(
        {
            "timestamp": datetime.now(UTC).isoformat(),
            "version": emulator.config.sglang_version,
            "accelerator": None,
            "num_accelerators": 1,
            "loads": entries,
        }
    )


def api_key_middleware(api_key: str) -> Middleware:
    """SGLang's ``--api-key`` check in front of every route, unknown ones included (so a
    wrong path without the key is 401, not 404, as in SGLang)."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        if not is_authorized(request.method, request.path, authorization, api_key):
            return json_response(UNAUTHORIZED_BODY, UNAUTHORIZED_STATUS)
        return await handler(request)

    return check


def dead_instance_middleware(instance: Instance) -> Middleware:
    """A request that reaches a dead instance (accepted before its socket closed) is
    reset, never answered."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if instance.dead:
            return await vanish(request)
        return await handler(request)

    return check


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """The decode instance's HTTP client for its prefill peers' bootstrap servers
    (no connection limit: every waiting decode request holds one long poll)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        app[SESSION_KEY] = session
        yield


def create_app(emulator: Emulator, instance: Instance) -> web.Application:
    api_key = emulator.config.api_key
    middlewares = [dead_instance_middleware(instance)]
    if api_key is not None:
        middlewares.append(api_key_middleware(api_key))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app[EMULATOR_KEY] = emulator
    app[INSTANCE_KEY] = instance
    if emulator.role == "decode":
        app.cleanup_ctx.append(_client_session)
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    for path in ("/health", "/health_generate", "/ready"):
        app.router.add_get(path, health)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info_handler)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info_handler)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model_card)
    app.router.add_get("/v1/loads", loads)
    add_admin_routes(app)
    return app
