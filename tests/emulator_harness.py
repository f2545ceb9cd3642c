"""Run an emulator on an ephemeral loopback port in a background thread, and talk to it.

The server binds 127.0.0.1:0; the harness reads the bound port back, waits for the bind
callback and checks /health before a test starts. Requests use urllib (plain HTTP/1.1).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

from scheduler.emulator.core import Emulator, EmulatorConfig
from scheduler.emulator.expert_location import trivial_location
from scheduler.emulator.server import serve
from scheduler.emulator.workload import DEFAULT_PROFILE, build_workload, prompt_index
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.placement import Placement
from scheduler.profile import load_profile

MODEL: ModelShape = PRESETS["deepseek-v2-lite"]
#: Generous bound for the server thread to bind or stop; never reached when all is well.
STARTUP_TIMEOUT_S = 60


def make_emulator(
    *,
    nodes: int = 2,
    gpus_per_node: int = 2,
    capacity: int = 8,
    time_scale: float = 0.0,
    seed: int = 0,
    prompts: Iterable[tuple[str, str]] = (),
    default_class: str = "general",
    placement: Placement | None = None,
    **options: Any,
) -> Emulator:
    """An emulator of the shipped default (ESFT) profile; instant unless time_scale > 0.

    ``options``: more :class:`EmulatorConfig` fields (``role``, ``sglang_version``,
    ``kv_timeout_s``, ...); a prefill's bootstrap server gets a free port unless given."""
    if options.get("role") == "prefill":
        options.setdefault("bootstrap_port", 0)
    config = EmulatorConfig(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        capacity=capacity,
        seed=seed,
        time_scale=time_scale,
        **options,
    )
    workload = build_workload(
        load_profile(DEFAULT_PROFILE), prompt_index(prompts), default=default_class
    )
    placement = placement or trivial_location(MODEL, config.num_ranks, gpus_per_node)
    return Emulator(config, MODEL, placement, workload, profile_source="test")


class EmulatorServer:
    """``with EmulatorServer(emulator) as server:`` serves on ``server.url`` until exit
    (on ``port``, or a free one)."""

    def __init__(self, emulator: Emulator, port: int = 0) -> None:
        self.emulator = emulator
        self.port = port
        self.url = ""
        #: A prefill's bootstrap server: (host, port); None for other roles.
        self.bootstrap: tuple[str, int] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(
                self.emulator,
                "127.0.0.1",
                self.port,
                self._stop,
                on_ready=self._on_ready,
                on_bootstrap_ready=self._on_bootstrap_ready,
                shutdown_grace_s=5.0,
            )

        try:
            asyncio.run(main())
        except BaseException as e:  # reported to the test thread
            self._error = e
            self._ready.set()

    def _on_bootstrap_ready(self, host: str, port: int) -> None:
        self.bootstrap = (host, port)

    def _on_ready(self, host: str, port: int) -> None:
        self.url = f"http://{host}:{port}"
        self._ready.set()

    def __enter__(self) -> EmulatorServer:
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"emulator did not start: {self._error!r}")
        status, _ = get(self.url + "/health")
        assert status == 200
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(STARTUP_TIMEOUT_S)
        assert not self._thread.is_alive(), "emulator thread did not stop"


def _read(response: Any) -> tuple[int, Any]:
    raw = response.read()
    ctype = response.headers.get("Content-Type", "")
    return response.status, json.loads(raw) if "json" in ctype else raw.decode()


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=STARTUP_TIMEOUT_S) as response:
            return _read(response)
    except urllib.error.HTTPError as e:
        with e:
            return _read(e)


def post(url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=STARTUP_TIMEOUT_S) as response:
            return _read(response)
    except urllib.error.HTTPError as e:
        with e:
            return _read(e)


def post_stream(url: str, body: Any) -> list[str]:
    """POST a streaming /generate; returns the ``data:`` payloads in arrival order."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    events = []
    with urllib.request.urlopen(request, timeout=STARTUP_TIMEOUT_S) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().rstrip("\n")
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
            else:
                assert line == "", f"unexpected SSE line {line!r}"
    return events


def rank_load(url: str, rank: int) -> dict[str, Any]:
    status, body = get(f"{url}/v1/loads?dp_rank={rank}")
    assert status == 200
    return body["loads"][0]


def wait_for_load(url: str, rank: int, **expected: int) -> dict[str, Any]:
    """Poll /v1/loads (no sleeps: each poll is a request) until the rank's fields match."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        load = rank_load(url, rank)
        if all(load[k] == v for k, v in expected.items()):
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"rank {rank} never reached {expected}; last load {load}")


def connection_fate(url: str, body: Any = None) -> str:
    """GET (or POST ``body`` to) ``url``: ``"reset"`` if the connection was reset or closed
    without an answer, ``"refused"`` if nothing listens, else ``"answered STATUS"``.

    A connection to a closed loopback port can connect to itself (the kernel picks the
    same port as its source: TCP simultaneous open); that counts as refused."""
    host, _, rest = url.removeprefix("http://").partition(":")
    port, _, path = rest.partition("/")
    connection = http.client.HTTPConnection(host, int(port), timeout=STARTUP_TIMEOUT_S)
    try:
        try:
            connection.connect()
        except ConnectionRefusedError:
            return "refused"
        assert connection.sock is not None
        try:
            if connection.sock.getsockname() == connection.sock.getpeername():
                return "refused"  # connected to itself: nothing listens there
        except OSError:  # ENOTCONN: accepted, then reset already
            return "reset"
        data = None if body is None else json.dumps(body).encode()
        method = "GET" if body is None else "POST"
        headers = {"Content-Type": "application/json"}
        connection.request(method, "/" + path, body=data, headers=headers)
        response = connection.getresponse()
        response.read()
        return f"answered {response.status}"
    except ConnectionError:  # reset, broken pipe; http.client.RemoteDisconnected is one
        return "reset"
    finally:
        connection.close()


def wait_for_fate(url: str, fate: str) -> None:
    """Poll ``url`` (each poll a request, no sleeps) until :func:`connection_fate` says
    ``fate`` (``"refused"``, ``"answered 200"``...)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (seen := connection_fate(url)) != fate:
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: expected {fate}, still {seen}")
