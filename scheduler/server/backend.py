"""SGLang's HTTP API as the scheduler uses it (sglang-integration.md §3-§4): ``/generate``
(unary and server-sent events), ``/health`` and ``/v1/loads``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np


class BackendError(Exception):
    """A failed backend call. ``retryable``: another attempt may succeed (before the
    first token only); ``rank_failed``: the DP rank itself is out (SGLang's 503 "DP rank
    R is not active."); ``invalid``: SGLang rejected the request (400)."""

    def __init__(
        self, message: str, *, retryable: bool, rank_failed: bool = False, invalid: bool = False
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.rank_failed = rank_failed
        self.invalid = invalid


class SGLangBackend:
    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, total_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total_s, sock_connect=self.connect_timeout_s)

    async def generate(self, payload: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        """One non-streaming ``/generate``; raises :class:`BackendError`."""
        try:
            async with self.session.post(
                f"{self.url}/generate", json=payload, timeout=self._timeout(timeout_s)
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise _http_error(resp.status, body)
                data = json.loads(body)
        except aiohttp.ClientError as e:
            raise BackendError(f"backend unreachable: {e}", retryable=True) from None
        except ValueError as e:
            raise BackendError(f"backend answered non-JSON ({e})", retryable=True) from None
        if not isinstance(data, dict):
            raise BackendError("backend answered a non-object", retryable=True)
        return data

    async def generate_stream(
        self, payload: dict[str, Any], timeout_s: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """The chunks of a streaming ``/generate`` (``data: {...}`` events up to
        ``[DONE]``); an error event raises a non-retryable :class:`BackendError`."""
        try:
            async with self.session.post(
                f"{self.url}/generate",
                json={**payload, "stream": True},
                timeout=self._timeout(timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise _http_error(resp.status, await resp.read())
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    chunk = json.loads(data)
                    if isinstance(chunk, dict) and "error" in chunk:
                        message = chunk["error"].get("message", chunk["error"])
                        raise BackendError(f"backend error: {message}", retryable=False)
                    yield chunk
        except aiohttp.ClientError as e:
            raise BackendError(f"backend unreachable: {e}", retryable=True) from None
        except ValueError as e:
            raise BackendError(f"backend sent a bad event ({e})", retryable=False) from None

    async def health(self, timeout_s: float) -> bool:
        try:
            async with self.session.get(
                f"{self.url}/health", timeout=self._timeout(timeout_s)
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def loads(self, num_ranks: int, timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(running [ranks], waiting [ranks]) from ``/v1/loads``; raises BackendError."""
        try:
            async with self.session.get(
                f"{self.url}/v1/loads", timeout=self._timeout(timeout_s)
            ) as resp:
                if resp.status != 200:
                    raise _http_error(resp.status, await resp.read())
                data = json.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise BackendError(f"/v1/loads failed: {e}", retryable=True) from None
        running = np.zeros(num_ranks, dtype=np.int64)
        waiting = np.zeros(num_ranks, dtype=np.int64)
        rows = data.get("loads", data) if isinstance(data, dict) else data
        for row in rows if isinstance(rows, list) else []:
            rank = row.get("dp_rank")
            if isinstance(rank, int) and 0 <= rank < num_ranks:
                running[rank] = int(row.get("num_running_reqs", 0))
                waiting[rank] = int(row.get("num_waiting_reqs", 0))
        return running, waiting


def _http_error(status: int, body: bytes) -> BackendError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    text = f"backend answered HTTP {status}: {message}"
    if status == 400:
        return BackendError(text, retryable=False, invalid=True)
    if status == 503 and "not active" in str(message):
        return BackendError(text, retryable=True, rank_failed=True)
    return BackendError(text, retryable=status >= 500)
