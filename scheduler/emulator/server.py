"""Run an emulated instance: its HTTP app, a prefill's bootstrap server, deaths, restarts.

:func:`serve` binds the SGLang API (and, for ``--role prefill``, the bootstrap server on
``--disaggregation-bootstrap-port``), serves until ``stop`` is set, and shuts down
gracefully. When the instance dies (:class:`.instance.Instance`: ``POST /admin/instance``
or a request pinned to a failed rank) it stops both apps at once (connections reset,
sockets closed) and, if a restart delay was given, binds the same ports again after it
with a fresh instance; the restart timer lives here, outside the apps it stops.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiohttp import web

from scheduler.emulator.app import create_app
from scheduler.emulator.bootstrap import create_bootstrap_app
from scheduler.emulator.core import Emulator
from scheduler.emulator.instance import Instance
from scheduler.errors import ConfigError

#: A restarting instance retries a busy port this often, for REBIND_TRIES tries.
REBIND_INTERVAL_S = 0.1
REBIND_TRIES = 100
#: Loop iterations a death waits before closing the sockets, so that connections the
#: loop accepted just before it are set up (and reset) instead of leaked half-open.
ACCEPTS_SETTLE_ITERATIONS = 5


async def _wait_first(*events: asyncio.Event) -> None:
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), SO_REUSEADDR as asyncio sets
    it. Ours, so that a death can stop accepting on it at once (:class:`.Instance`)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sock = socket.create_server((host, port), family=family[0][0], backlog=128)
    sock.setblocking(False)
    return sock


async def _start(
    app: web.Application,
    host: str,
    port: int,
    shutdown_grace_s: float,
    *,
    bind_tries: int = 1,
) -> tuple[web.AppRunner, socket.socket]:
    """Serve ``app`` on ``host:port`` (0: a free port); returns the runner and its
    listening socket.

    ``bind_tries`` > 1 (a restart): retry a busy port every :data:`REBIND_INTERVAL_S`,
    since a local client probing the closed port may hold it a moment (a loopback connect
    to a closed port can connect to itself)."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=shutdown_grace_s,
        handler_cancellation=True,  # a client that goes away aborts its request, as in SGLang
    )
    await runner.setup()
    try:
        for attempt in range(bind_tries):
            try:
                sock = _listen(host, port)
                break
            except OSError:
                if attempt + 1 == bind_tries:
                    raise
                await asyncio.sleep(REBIND_INTERVAL_S)
        await web.SockSite(runner, sock).start()  # the site's server closes the socket
    except BaseException:
        await runner.cleanup()
        raise
    return runner, sock


async def serve(
    emulator: Emulator,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    on_ready: Callable[[str, int], None] | None = None,
    on_bootstrap_ready: Callable[[str, int], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    shutdown_grace_s: float = 5.0,
) -> None:
    """Serve until ``stop`` is set, then shut down gracefully.

    ``on_ready(host, port)`` is called once the API socket is bound (port 0 gets a free
    port), after ``on_bootstrap_ready(host, port)`` for a prefill's bootstrap server.
    ``on_event(message)`` hears of deaths and restarts. On stop: /health turns 503, queued
    and hung requests are refused (503), running ones get ``shutdown_grace_s`` seconds to
    finish before they are cancelled.
    """
    instance = Instance()
    prefill = emulator.role == "prefill"
    boot_port = emulator.config.bootstrap_port
    first = True
    while True:
        runners: list[web.AppRunner] = []
        try:
            tries = 1 if first else REBIND_TRIES
            app = create_app(emulator, instance)
            runner, sock = await _start(app, host, port, shutdown_grace_s, bind_tries=tries)
            runners.append(runner)
            sockets = [sock]
            port = int(sock.getsockname()[1])
            if prefill:
                boot_app = create_bootstrap_app(emulator.rooms)
                try:
                    boot, boot_sock = await _start(
                        boot_app, host, boot_port, shutdown_grace_s, bind_tries=tries
                    )
                except OSError as e:
                    raise ConfigError(
                        f"cannot listen on {host}:{boot_port} for the bootstrap server "
                        f"(--disaggregation-bootstrap-port): {e.strerror or e}"
                    ) from e
                runners.append(boot)
                sockets.append(boot_sock)
                boot_port = emulator.bootstrap_port = int(boot_sock.getsockname()[1])
            instance.attach(runners, sockets)
            if first:
                if prefill and on_bootstrap_ready is not None:
                    on_bootstrap_ready(host, boot_port)
                if on_ready is not None:
                    on_ready(host, port)
                first = False
            elif on_event is not None:
                on_event(f"instance restarted, listening again on port {port}")
            await _wait_first(stop, instance.death)
            emulator.closing = True
            emulator.pool.close()
            for _ in range(ACCEPTS_SETTLE_ITERATIONS):  # see Instance.die
                await asyncio.sleep(0)
        finally:
            for r in reversed(runners):
                await r.cleanup()
        if not instance.dead:
            return  # stopped
        delay = instance.restart_after_s
        if on_event is not None:
            then = "stays down" if delay is None else f"restarts in {delay:g} s"
            on_event(f"instance died ({instance.reason}); it {then}")
        if delay is None:
            await stop.wait()
            return
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except TimeoutError:
            pass
        emulator.reset()
        instance.revive()
