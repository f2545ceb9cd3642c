"""One exception hierarchy for the whole package.

The CLI prints any :class:`MoeSchedulerError` as a one-line message and exits non-zero;
anything else escaping is a bug. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

from os import PathLike


class MoeSchedulerError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(MoeSchedulerError):
    """An input file (trace, profile, dump) is missing, corrupt or inconsistent.

    The message always names the file and the problem: ``"<path>: <problem>"``.
    """

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")


class ConfigError(MoeSchedulerError):
    """An option or configuration value is invalid; the message names it and the fix."""


class MissingDependencyError(MoeSchedulerError):
    """An optional dependency (an extra) is needed for what was asked."""


# ------------------------------------------------------------------ serving


class RequestError(MoeSchedulerError):
    """A request the server cannot serve. ``outcome``: how the call ends, one of
    ``scheduler.server.metrics.OUTCOMES`` other than ok, cancelled and client_deadline
    (which the front ends see themselves). Each front end maps outcomes to its statuses in
    one table: ``scheduler.server.service.STATUS`` (gRPC) and
    ``scheduler.server.openai_requests.ERRORS`` (HTTP)."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class Overloaded(RequestError):
    """Admission refused: the queue is full, or the server is shutting down."""

    def __init__(self, message: str) -> None:
        super().__init__("overloaded", f"the scheduler is overloaded: {message}")


class DeadlineRefused(RequestError):
    """The request's deadline cannot cover its expected wait and service."""

    def __init__(self, message: str) -> None:
        super().__init__("refused_deadline", f"refused early: {message}")


class BackendError(MoeSchedulerError):
    """A failed call to SGLang. ``retryable``: another attempt may succeed (before the
    first token only). ``instance``: the name of the instance that failed, set by the
    caller that knows it."""

    retryable = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable
        self.instance = ""


class BackendUnreachable(BackendError):
    """No connection to SGLang at all (refused, reset, dropped): it is restarting or down,
    worth retrying with backoff until ``backend.unreachable_retry_s``."""


class RankFailed(BackendError):
    """The DP rank itself is out (SGLang's 503 "DP rank R is not active.")."""


class BackendRejected(BackendError):
    """SGLang rejected the request (400): another attempt would be rejected too."""

    retryable = False
