"""An emulated instance dying as SGLang's does: all at once, with no HTTP answer.

SGLang fails per instance, not per rank: a request pinned to an inactive DP rank makes
its DP controller raise, which sends SIGQUIT to the server (no 503 is ever sent); in a
multi-node instance a lost GPU ends the whole instance (docs/sources.md, SGLang
"Failure"). So a
death here resets every open connection (``transport.abort()``: the peers see a TCP
reset) and closes the listening sockets (new connections are refused). :mod:`.server`
then stops the aiohttp apps and, when asked to, listens again on the same ports after
``restart_after_s`` wall seconds with a fresh instance.

:class:`Instance` lives in the process, outside the aiohttp apps it stops (the admin
endpoint that asked for the death dies with them), and is shared by the HTTP handlers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

from aiohttp import web


class Instance:
    """The life of one emulated instance across its deaths and restarts in this process.

    Create it inside the running event loop.
    """

    def __init__(self) -> None:
        self.dead = False
        self.reason = ""
        self.restart_after_s: float | None = None
        self.deaths = 0
        self.death = asyncio.Event()
        self._runners: Sequence[web.BaseRunner] = ()
        self._sockets: Sequence[socket.socket] = ()

    def attach(self, runners: Sequence[web.BaseRunner], sockets: Sequence[socket.socket]) -> None:
        """The runners (HTTP app, bootstrap server) serving this run of the instance, and
        their listening sockets."""
        self._runners, self._sockets = tuple(runners), tuple(sockets)

    def die(
        self,
        reason: str,
        restart_after_s: float | None = None,
        *,
        spare: asyncio.BaseTransport | None = None,
    ) -> None:
        """Die now: reset every open connection but ``spare`` (the admin request that
        asked, which still gets its answer and is then closed), and let :mod:`.server`
        close the listening sockets. ``restart_after_s``: listen again after that many
        wall seconds (None: stay down). A second call while dead does nothing."""
        if self.dead:
            return
        self.dead, self.reason, self.restart_after_s = True, reason, restart_after_s
        self.deaths += 1
        # Stop accepting now; :mod:`.server` closes the sockets a few loop iterations
        # later, once connections accepted just before are set up (closing an asyncio
        # server while one is being set up leaks it half-open: it is never answered).
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
        for runner in self._runners:
            server = runner.server
            for handler in server.connections if server is not None else ():
                transport = handler.transport
                if transport is not None and transport is not spare:
                    transport.abort()  # RST: the client sees "connection reset by peer"
        self.death.set()

    def revive(self) -> None:
        """A new run of the instance starts (after its restart delay)."""
        self.dead, self.reason, self.restart_after_s = False, "", None
        self.death = asyncio.Event()
        self._runners, self._sockets = (), ()


async def vanish(request: web.Request) -> web.StreamResponse:
    """Never answer ``request``: reset its connection and wait to be cancelled (the
    runners are built with ``handler_cancellation``, so the reset cancels the handler)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    await asyncio.get_running_loop().create_future()  # cancelled by the lost connection
    raise AssertionError("unreachable")  # pragma: no cover
