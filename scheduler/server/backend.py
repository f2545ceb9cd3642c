"""SGLang's HTTP API as the scheduler uses it (docs/server.md): ``/generate`` and the
OpenAI ``/v1/chat/completions`` and ``/v1/completions`` (unary and server-sent events),
``/health``, ``/v1/loads`` and ``/server_info``; one
:class:`SGLangBackend` per SGLang instance.

Responses are read as bytes (``wire.py``): the routed experts stay raw base64 for the
telemetry worker, streamed chunks are decoded only where they are new, and no event is
limited by aiohttp's line length.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson

from scheduler.errors import BackendError, BackendRejected, BackendUnreachable, RankFailed
from scheduler.server.wire import (
    OpenAIEvents,
    SSEEvents,
    StreamDelta,
    WireError,
    loads,
    openai_content,
    openai_meta,
    split_routed,
)

#: SGLang's native endpoint; the OpenAI ones are CHAT and COMPLETIONS.
GENERATE = "/generate"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
#: The OpenAI endpoints read the routing key from this header, not from the body
#: (``serving_base.extract_routing_key``, from 0.5.8; older versions ignore it).
ROUTING_KEY_HEADER = "x-smg-routing-key"


def _encode(path: str, payload: dict[str, Any]) -> tuple[bytes, dict[str, str] | None]:
    """The request body and extra headers for ``path``: ``/generate`` takes the
    ``routing_key`` in the body, an OpenAI endpoint as :data:`ROUTING_KEY_HEADER`."""
    if path == GENERATE or "routing_key" not in payload:
        return orjson.dumps(payload), None
    body = {k: v for k, v in payload.items() if k != "routing_key"}
    return orjson.dumps(body), {ROUTING_KEY_HEADER: str(payload["routing_key"])}


@dataclass
class Answer:
    """A finished ``/generate``: its ``meta_info`` (without routed experts), the text and
    ids (unary only; a stream relayed them), and the routed experts as base64 bytes. From
    an OpenAI endpoint: ``meta`` in the same terms (``wire.openai_meta``), the first
    choice's text and the body."""

    meta: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    routed: bytes | None = None
    #: An OpenAI endpoint's unary answer as the client gets it (routed experts cut out).
    body: bytes = b""


class SGLangBackend:
    """``api_key``: sent as ``Authorization: Bearer`` (SGLang ``--api-key``)."""

    def __init__(self, url: str, connect_timeout_s: float, api_key: str = "") -> None:
        self.url = url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                headers=self._headers,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, total_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total_s, sock_connect=self.connect_timeout_s)

    async def _post(self, path: str, payload: dict[str, Any], timeout_s: float | None) -> bytes:
        """The body of a 200 answer to POST ``path``; raises :class:`BackendError`."""
        data, headers = _encode(path, payload)
        try:
            async with self.session.post(
                f"{self.url}{path}", data=data, headers=headers, timeout=self._timeout(timeout_s)
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise _http_error(resp.status, body)
                return body
        except aiohttp.ClientError as e:
            raise _client_error(e) from e

    async def generate(
        self, payload: dict[str, Any], timeout_s: float | None, path: str = GENERATE
    ) -> Answer:
        """One non-streaming ``/generate`` (or OpenAI ``path``); raises
        :class:`BackendError`."""
        body = await self._post(path, payload, timeout_s)
        try:
            rest, routed = split_routed(body)
            data = loads(rest)
        except WireError as e:
            raise BackendError(f"backend answered {e}") from e
        if not isinstance(data, dict):
            raise BackendError("backend answered a non-object")
        if path != GENERATE:
            return Answer(openai_meta(data), openai_content(data), routed=routed, body=rest)
        meta = data.get("meta_info")
        try:
            ids = [int(i) for i in data.get("output_ids") or []]
        except (TypeError, ValueError) as e:
            raise BackendError("backend answered bad output_ids") from e
        return Answer(
            meta if isinstance(meta, dict) else {}, str(data.get("text") or ""), ids, routed
        )

    async def generate_stream(
        self,
        payload: dict[str, Any],
        timeout_s: float | None,
        max_event_bytes: int,
        openai: OpenAIEvents | None = None,
        path: str = GENERATE,
    ) -> AsyncIterator[tuple[str, Any] | Answer]:
        """The new (text, ids) of each streamed ``/generate`` chunk, or with ``openai``
        (an OpenAI ``path``) the (new text, event to relay or None) of each chunk; then
        the :class:`Answer` of the last one. An error event raises a non-retryable
        :class:`BackendError`."""
        events = SSEEvents(max_event_bytes)
        feed = StreamDelta().feed if openai is None else openai.feed
        last = b""
        data, headers = _encode(path, {**payload, "stream": True})
        try:
            async with self.session.post(
                f"{self.url}{path}", data=data, headers=headers, timeout=self._timeout(timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise _http_error(resp.status, await resp.read())
                done = False
                async for data in resp.content.iter_any():
                    for raw in events.feed(data):
                        if raw == b"[DONE]":
                            done = True
                            break
                        if b'"error"' in raw[:16]:
                            raise _event_error(raw)
                        yield feed(raw)
                        last = raw
                    if done:
                        break
                if not done:
                    for raw in events.close():
                        if raw != b"[DONE]":
                            yield feed(raw)
                            last = raw
        except aiohttp.ClientError as e:
            raise _client_error(e) from e
        except WireError as e:
            raise BackendError(f"backend sent a bad event ({e})", retryable=False) from e
        yield _final(last) if openai is None else Answer(openai.meta, routed=openai.routed)

    async def health(self, timeout_s: float) -> bool | None:
        """``/health``: True when it answers 200, False when it answers otherwise or the
        connection is refused or reset (down), None when it did not answer in time (a
        busy server is slow, not down)."""
        try:
            async with self.session.get(
                f"{self.url}/health", timeout=self._timeout(timeout_s)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ServerTimeoutError, TimeoutError):
            return None
        except aiohttp.ClientError:
            return False

    async def _get_json(self, path: str, timeout_s: float) -> Any:
        """GET ``path`` and its JSON body; raises BackendError."""
        try:
            async with self.session.get(
                f"{self.url}{path}", timeout=self._timeout(timeout_s)
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise _http_error(resp.status, body)
                return loads(body)
        except (aiohttp.ClientError, TimeoutError, WireError) as e:
            raise BackendError(f"{path} failed: {e}") from e

    async def server_info(self, timeout_s: float) -> dict[str, Any]:
        """``/server_info`` (SGLang's resolved server arguments and ``version``); raises
        BackendError."""
        data = await self._get_json("/server_info", timeout_s)
        if not isinstance(data, dict):
            raise BackendError("/server_info answered a non-object")
        return data

    async def loads(self, num_ranks: int, timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(running [ranks], waiting [ranks]) from ``/v1/loads``; raises BackendError."""
        data = await self._get_json("/v1/loads", timeout_s)
        running = np.zeros(num_ranks, dtype=np.int64)
        waiting = np.zeros(num_ranks, dtype=np.int64)
        rows = data.get("loads", data) if isinstance(data, dict) else data
        for row in rows if isinstance(rows, list) else []:
            rank = row.get("dp_rank") if isinstance(row, dict) else None
            if isinstance(rank, int) and 0 <= rank < num_ranks:
                running[rank] = int(row.get("num_running_reqs", 0))
                waiting[rank] = int(row.get("num_waiting_reqs", 0))
        return running, waiting


def _final(raw: bytes) -> Answer:
    """The :class:`Answer` of a stream's last event (its meta_info and routed experts)."""
    if not raw:
        return Answer()
    rest, routed = split_routed(raw)
    try:
        chunk = loads(rest)
    except WireError:
        return Answer(routed=routed)
    meta = chunk.get("meta_info") if isinstance(chunk, dict) else None
    return Answer(meta if isinstance(meta, dict) else {}, routed=routed)


def _event_error(raw: bytes) -> BackendError:
    try:
        error = loads(raw)["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
    except (WireError, KeyError, TypeError):
        message = raw[:200].decode("utf-8", "replace")
    return BackendError(f"backend error: {message}", retryable=False)


def _client_error(e: aiohttp.ClientError) -> BackendError:
    # Refused, reset or dropped connections: SGLang is down or restarting.
    unreachable = isinstance(e, aiohttp.ClientConnectionError) and not isinstance(
        e, aiohttp.ServerTimeoutError
    )
    kind = BackendUnreachable if unreachable else BackendError
    return kind(f"backend unreachable: {e}")


def _http_error(status: int, body: bytes) -> BackendError:
    # {"error": {"message": ...}}, or SGLang's ErrorResponse {"object": "error", "message"}
    try:
        data = loads(body)
        message = data["error"]["message"] if "error" in data else data["message"]
    except (WireError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    text = f"backend answered HTTP {status}: {str(message)[:300]}"
    if status == 400:
        return BackendRejected(text)
    if status == 503 and "not active" in str(message):
        return RankFailed(text)
    return BackendError(text, retryable=status >= 500)
