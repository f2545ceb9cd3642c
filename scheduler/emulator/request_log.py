"""What the emulator was sent and what became of it, for tests: ``GET /admin/requests``.

Pure bookkeeping. The hot path appends one tuple per finished request to a bounded deque
(the last :data:`DEFAULT_REQUEST_LOG_SIZE`) and bumps per-rank counters; the JSON rows are
built only when asked for. The log belongs to the emulator process, not to one run of
its instance: it survives an instance death and restart (``POST /admin/instance``), so a
test can read, after the restart, what the dead instance had received.
"""

from __future__ import annotations

from collections import deque
from typing import Any

#: Requests kept (the oldest are dropped first).
DEFAULT_REQUEST_LOG_SIZE = 10_000
#: How a request ended: answered, answered with an error (or cut off by an instance
#: death), or cancelled by its client going away.
OUTCOMES = ("ok", "error", "cancelled")
_FIELDS = (
    "rid",
    "dp_rank",
    "pinned_field",
    "bootstrap_room",
    "bootstrap_host",
    "bootstrap_port",
    "disagg_prefill_dp_rank",
    "outcome",
    "completion_tokens",
    "error",
)


class RequestLog:
    """The last ``size`` requests of an instance of role ``role`` with ``num_ranks`` ranks,
    and per-rank counts over the process's whole life."""

    def __init__(self, role: str, num_ranks: int, size: int = DEFAULT_REQUEST_LOG_SIZE) -> None:
        if size < 1:
            raise ValueError(f"the request log size must be >= 1, got {size}")
        self.role = role
        self._rows: deque[tuple[Any, ...]] = deque(maxlen=size)
        #: Requests answered successfully, per rank they ran on.
        self.served = [0] * num_ranks
        #: Decode requests whose ``disagg_prefill_dp_rank`` named the prefill rank that
        #: did the work (so the hint was honoured), per decode rank.
        self.prefill_rank_honoured = [0] * num_ranks

    def add(
        self,
        rid: str | None,
        dp_rank: int | None,
        pinned_field: str | None,
        bootstrap: tuple[int | None, str | None, int | None],
        disagg_prefill_dp_rank: int | None,
        outcome: str,
        completion_tokens: int,
        error: str | None = None,
    ) -> None:
        """One finished request; ``bootstrap`` is (room, host, port) as received."""
        room, host, port = bootstrap
        self._rows.append(
            (
                rid,
                dp_rank,
                pinned_field,
                room,
                host,
                port,
                disagg_prefill_dp_rank,
                outcome,
                completion_tokens,
                error,
            )
        )
        if outcome == "ok" and dp_rank is not None:
            self.served[dp_rank] += 1

    def honoured(self, dp_rank: int) -> None:
        """A decode request on ``dp_rank`` found its KV on the prefill rank it named."""
        self.prefill_rank_honoured[dp_rank] += 1

    def __len__(self) -> int:
        return len(self._rows)

    def to_json(self) -> dict[str, Any]:
        """``{"role", "requests": [{rid, role, dp_rank, pinned_field, bootstrap_room,
        bootstrap_host, bootstrap_port, disagg_prefill_dp_rank, outcome,
        completion_tokens, error}], "served": [per rank],
        "disagg_prefill_dp_rank_honoured": [per rank]}``, oldest request first."""
        role = self.role
        return {
            "role": role,
            "requests": [
                {"role": role, **dict(zip(_FIELDS, row, strict=True))} for row in self._rows
            ],
            "served": list(self.served),
            "disagg_prefill_dp_rank_honoured": list(self.prefill_rank_honoured),
        }
