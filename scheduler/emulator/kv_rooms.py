"""PD disaggregation: the bootstrap rooms that stand in for SGLang's KV transfer.

Real SGLang moves the KV cache from a prefill instance to a decode instance over
mooncake / NIXL (``--disaggregation-transfer-backend``); a bootstrap HTTP server on the
prefill instance (``--disaggregation-bootstrap-port``, default 8998) only lets the peers
find each other. No KV exists here, so the emulator's bootstrap server does the pairing
and stands in for the transfer itself:

* the prefill instance runs a request's prefill on its rank, then *publishes* the room
  (:meth:`KvRooms.publish`) and waits, bounded, until a decode peer has fetched it;
* the decode instance fetches ``GET http://BOOTSTRAP_HOST:BOOTSTRAP_PORT/kv/ROOM`` (a long
  poll, bounded): 200 ``{"bootstrap_room", "prefill_dp_rank", "prompt_tokens"}`` once
  the prefill is done, which also releases the prefill leg.

:class:`KvRooms` is asyncio bookkeeping (events, no I/O); ``bootstrap`` serves it over
HTTP and holds the decode side's client. Timeouts here are wall seconds: they wait on
another process, not on the modelled GPU.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from scheduler.errors import MoeSchedulerError

#: SGLang's ``--disaggregation-bootstrap-port`` default.
DEFAULT_BOOTSTRAP_PORT = 8998
#: Default bound (wall seconds) on a PD leg's wait for its peer.
DEFAULT_KV_TIMEOUT_S = 30.0
#: Failed rooms remembered, so that a decode peer arriving after its prefill failed is
#: told at once instead of waiting out its timeout.
FAILED_ROOMS_KEPT = 10_000


class KvTransferFailed(MoeSchedulerError):
    """A room's KV hand-over failed: no peer in time, a failed prefill, a wrong rank."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Room:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    fetched: asyncio.Event = field(default_factory=asyncio.Event)
    has_prefill: bool = False
    prefill_dp_rank: int | None = None
    prompt_tokens: int = 0
    failure: str | None = None
    decode_waiters: int = 0


@dataclass(frozen=True)
class KvHandoff:
    """What a decode peer learns when it fetches a room."""

    bootstrap_room: int
    prefill_dp_rank: int
    prompt_tokens: int


class KvRooms:
    """The bootstrap rooms of one prefill instance (one run of it)."""

    def __init__(self) -> None:
        self._rooms: dict[int, _Room] = {}
        self._failed: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rooms)

    def open(self, room: int) -> None:
        """A prefill request takes ``room``; KvTransferFailed if another prefill has it
        (SGLang: "Duplicate or cancelled bootstrap room")."""
        entry = self._rooms.setdefault(room, _Room())
        if entry.has_prefill:
            raise KvTransferFailed(f"Duplicate or cancelled bootstrap room {room}")
        entry.has_prefill = True

    def publish(self, room: int, prefill_dp_rank: int, prompt_tokens: int) -> None:
        """The prefill of ``room`` is done on ``prefill_dp_rank``: its KV can be fetched."""
        entry = self._rooms[room]
        entry.prefill_dp_rank, entry.prompt_tokens = prefill_dp_rank, prompt_tokens
        entry.ready.set()

    def fail(self, room: int, message: str) -> None:
        """The hand-over of ``room`` failed: whoever waits on it is told ``message``."""
        entry = self._rooms.get(room)
        if entry is not None:
            entry.failure = entry.failure or message
            entry.ready.set()
            entry.fetched.set()

    async def wait_fetched(self, room: int, timeout_s: float) -> None:
        """The prefill side: wait until a decode peer has fetched ``room``. Raises
        KvTransferFailed on a failure or after ``timeout_s`` (SGLang's bootstrap timeout)."""
        entry = self._rooms[room]
        try:
            await asyncio.wait_for(entry.fetched.wait(), timeout_s)
        except TimeoutError:
            raise KvTransferFailed(
                f"KVTransferError(bootstrap_room={room}): Request {room} timed out after "
                f"{timeout_s:.1f}s in KVPoll.Bootstrapping"
            ) from None
        if entry.failure is not None:
            raise KvTransferFailed(f"KVTransferError(bootstrap_room={room}): {entry.failure}")

    def close(self, room: int) -> None:
        """The prefill side is done with ``room`` (answered or failed): forget it once no
        decode peer waits on it."""
        entry = self._rooms.get(room)
        if entry is None:
            return
        entry.has_prefill = False
        if not entry.fetched.is_set():  # waiting decode peers are told at once
            self.fail(room, "the prefill request ended before its KV was fetched")
        if entry.failure is not None:  # and so is one that comes later
            self._failed[room] = entry.failure
            while len(self._failed) > FAILED_ROOMS_KEPT:
                self._failed.popitem(last=False)
        if entry.decode_waiters == 0:
            del self._rooms[room]

    async def fetch(
        self, room: int, timeout_s: float, expected_rank: int | None = None
    ) -> KvHandoff:
        """The decode side: wait up to ``timeout_s`` for ``room``'s prefill, take its KV.

        ``expected_rank`` (the decode's ``disagg_prefill_dp_rank``) must be the rank that
        did the prefill: otherwise the hand-over fails on both legs (409 here), as in
        SGLang, where the decode then talks to a prefill rank that has no such room and
        both legs time out. Raises KvTransferFailed with an HTTP status: 408 (no prefill
        in time), 409 (wrong rank), 500 (the prefill failed).
        """
        failure = self._failed.pop(room, None)
        if failure is not None and room not in self._rooms:
            raise KvTransferFailed(f"bootstrap room {room}: {failure}", 500)
        entry = self._rooms.setdefault(room, _Room())
        entry.decode_waiters += 1
        try:
            await asyncio.wait_for(entry.ready.wait(), timeout_s)
        except TimeoutError:
            raise KvTransferFailed(
                f"bootstrap room {room}: no prefill finished within {timeout_s:g} s", 408
            ) from None
        finally:
            entry.decode_waiters -= 1
            if entry.decode_waiters == 0 and not entry.has_prefill:
                self._rooms.pop(room, None)
        if entry.failure is not None:
            raise KvTransferFailed(f"bootstrap room {room}: {entry.failure}", 500)
        if entry.fetched.is_set():
            raise KvTransferFailed(f"bootstrap room {room}: its KV was already fetched", 409)
        rank = entry.prefill_dp_rank
        assert rank is not None  # set by publish
        if expected_rank is not None and expected_rank != rank:
            self.fail(
                room,
                f"the decode peer asked for prefill DP rank {expected_rank} "
                f"(disagg_prefill_dp_rank) but the KV is on prefill DP rank {rank}",
            )
            raise KvTransferFailed(
                f"bootstrap room {room}: the KV is on prefill DP rank {rank}, not on "
                f"prefill DP rank {expected_rank} (disagg_prefill_dp_rank)",
                409,
            )
        entry.fetched.set()
        return KvHandoff(room, rank, entry.prompt_tokens)
