"""What the emulator's aiohttp modules share: the app keys and SGLang's JSON replies."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from scheduler.emulator.core import Emulator
from scheduler.emulator.instance import Instance

EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("emulator", Emulator)
INSTANCE_KEY: web.AppKey[Instance] = web.AppKey("instance", Instance)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def error_response(message: str, status: int) -> web.Response:
    """SGLang's error body for a refused request: ``{"error": {"message": ...}}``."""
    return json_response({"error": {"message": message}}, status)
