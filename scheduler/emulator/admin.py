"""The emulator's own endpoints (SGLang has none of them), under ``/admin``.

* ``GET /admin/ranks`` ``{"modes": [...]}``; ``POST /admin/ranks/{rank}``
  ``{"mode": "ok" | "fail" | "hang", "restart_after_s": X}``: the failure switch. ``fail``
  makes the rank inactive as SGLang's DP controller sees it: the load balancer skips it
  and a request pinned to it takes the instance down (restarting after
  ``restart_after_s`` wall seconds when given). Failing a rank that has requests in
  flight takes the instance down at once, as a lost GPU ends a multi-node instance.
* ``POST /admin/instance`` ``{"mode": "die", "restart_after_s": X}``: the instance dies
  now (every other connection reset, the listening socket closed); with
  ``restart_after_s`` it listens again on the same port after X wall seconds, fresh.
  The answer carries ``finished_reqs``, the requests it had finished when it died.
* ``GET|POST /admin/config`` ``{"time_scale": X}``: wall seconds per modelled second.
* ``GET /admin/requests``: the last requests' received fields and outcomes, and served
  counts per rank (:mod:`.request_log`).

Errors are ``{"error": {"message": ...}}`` with status 400.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from scheduler.emulator.web_common import EMULATOR_KEY, INSTANCE_KEY, error_response, json_response


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of the request; ValueError naming the problem."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"the request body is not JSON ({e})") from e
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    return body


def _restart_after(body: dict[str, Any]) -> float | None:
    value = body.get("restart_after_s")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"restart_after_s must be a number >= 0 or null, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"restart_after_s must be finite, got {value!r}")
    return float(value)


async def admin_ranks(request: web.Request) -> web.Response:
    return json_response({"modes": request.app[EMULATOR_KEY].pool.modes()})


async def admin_set_rank(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    pool = emulator.pool
    try:
        rank = int(request.match_info["rank"])
        body = await _body(request)
        mode = str(body.get("mode"))
        restart = _restart_after(body)
        pool.validate_mode(rank, mode)
    except ValueError as e:
        return error_response(str(e), 400)
    instance = "up"
    if mode == "fail" and pool.busy(rank):  # a GPU lost with work on it: the instance ends
        request.app[INSTANCE_KEY].die(
            f"DP rank {rank} failed with requests in flight", restart, spare=request.transport
        )
        instance = "down"
    pool.set_mode(rank, mode, restart)
    return json_response({"dp_rank": rank, "mode": mode, "instance": instance})


async def admin_instance(request: web.Request) -> web.Response:
    try:
        body = await _body(request)
        restart = _restart_after(body)
        if body.get("mode") != "die":
            raise ValueError(f"mode must be 'die', got {body.get('mode')!r}")
    except ValueError as e:
        return error_response(str(e), 400)
    # Answered before the connection is closed; every other connection is reset now.
    request.app[INSTANCE_KEY].die("POST /admin/instance", restart, spare=request.transport)
    finished = sum(r.finished for r in request.app[EMULATOR_KEY].pool.ranks)
    return json_response({"mode": "die", "restart_after_s": restart, "finished_reqs": finished})


async def admin_config(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    if request.method == "POST":
        try:
            body = await _body(request)
        except ValueError as e:
            return error_response(str(e), 400)
        scale = body.get("time_scale")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale >= 0:
            return error_response(f"time_scale must be a number >= 0, got {scale!r}", 400)
        emulator.time_scale = float(scale)
        emulator.pool.wake()  # running requests continue at the new scale
    return json_response({"time_scale": emulator.time_scale})


async def admin_requests(request: web.Request) -> web.Response:
    return json_response(request.app[EMULATOR_KEY].requests.to_json())


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/ranks", admin_ranks)
    app.router.add_post("/admin/ranks/{rank}", admin_set_rank)
    app.router.add_post("/admin/instance", admin_instance)
    app.router.add_get("/admin/config", admin_config)
    app.router.add_post("/admin/config", admin_config)
    app.router.add_get("/admin/requests", admin_requests)
