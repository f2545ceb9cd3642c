"""The prefill instance's bootstrap HTTP server, and the decode side's client for it.

Stand-in for SGLang's KV transfer (see :mod:`.kv_rooms`): real SGLang moves the KV over
mooncake / NIXL and its bootstrap server (``--disaggregation-bootstrap-port``, default
8998) only pairs the peers; here ``GET /kv/{room}`` pairs them and hands over the room's
facts in place of the KV. ``GET /health`` answers ``OK`` as SGLang's bootstrap server does.
"""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp
from aiohttp import web

from scheduler.emulator.kv_rooms import DEFAULT_KV_TIMEOUT_S, KvHandoff, KvRooms, KvTransferFailed

ROOMS_KEY: web.AppKey[KvRooms] = web.AppKey("kv_rooms", KvRooms)


# --------------------------------------------------------------------------- HTTP


def _error(message: str, status: int, **extra: Any) -> web.Response:
    return web.json_response({"error": {"message": message}, **extra}, status=status)


async def _kv(request: web.Request) -> web.Response:
    rooms = request.app[ROOMS_KEY]
    query = request.query
    try:
        room = int(request.match_info["room"])
        timeout_s = float(query.get("timeout_s", DEFAULT_KV_TIMEOUT_S))
        expected = int(query["prefill_dp_rank"]) if "prefill_dp_rank" in query else None
    except ValueError as e:
        return _error(f"bad bootstrap request ({e})", 400)
    if not 0 <= room < 2**63 or not (math.isfinite(timeout_s) and timeout_s >= 0):
        return _error("bootstrap_room must be an int64 >= 0 and timeout_s a number >= 0", 400)
    try:
        handoff = await rooms.fetch(room, timeout_s, expected)
    except KvTransferFailed as e:
        return _error(str(e), e.status, bootstrap_room=room)
    return web.json_response(
        {
            "bootstrap_room": handoff.bootstrap_room,
            "prefill_dp_rank": handoff.prefill_dp_rank,
            "prompt_tokens": handoff.prompt_tokens,
        }
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


def create_bootstrap_app(rooms: KvRooms) -> web.Application:
    """The prefill instance's bootstrap server: ``GET /kv/{room}[?timeout_s=&prefill_dp_rank=]``
    and ``GET /health`` (SGLang's bootstrap server has one too). No API key, as SGLang's."""
    app = web.Application()
    app[ROOMS_KEY] = rooms
    app.router.add_get("/kv/{room}", _kv)
    app.router.add_get("/health", _health)
    return app


async def fetch_kv(
    session: aiohttp.ClientSession,
    host: str,
    port: int,
    room: int,
    timeout_s: float,
    expected_rank: int | None = None,
) -> KvHandoff:
    """The decode side: long-poll the prefill's bootstrap server for ``room``'s KV.
    Raises KvTransferFailed (an unreachable or dead prefill included)."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/kv/{room}"
    params = {"timeout_s": f"{timeout_s:g}"}
    if expected_rank is not None:
        params["prefill_dp_rank"] = str(expected_rank)
    try:
        async with session.get(
            url, params=params, timeout=aiohttp.ClientTimeout(total=timeout_s + 10)
        ) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as e:
        raise KvTransferFailed(
            f"Lost connection with prefill instance (bootstrap_addr: {host}:{port}): "
            f"{type(e).__name__} {e}"
        ) from e
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if status != 200 or not isinstance(body, dict):
        message = raw.decode("utf-8", "replace")[:500]
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message"))
        raise KvTransferFailed(f"bootstrap {host}:{port} answered {status}: {message}")
    try:
        return KvHandoff(room, int(body["prefill_dp_rank"]), int(body["prompt_tokens"]))
    except (KeyError, TypeError, ValueError):
        raise KvTransferFailed(f"bootstrap {host}:{port} answered {body!r}") from None
