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
