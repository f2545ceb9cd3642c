"""Progress on stderr for long work: throttled lines (``moe-scheduler`` commands, fit)
and a count bar (client replay). ``Progress`` is what long-running library functions
take: a callable given a one-line message."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

Progress = Callable[[str], None]


class ProgressLines:
    """Progress lines on stderr, at most one every ``interval`` seconds; with
    ``at_once=False`` none before the first interval has passed (short work says
    nothing)."""

    def __init__(self, interval: float = 2.0, *, at_once: bool = True) -> None:
        self.interval = interval
        self.last = time.monotonic() - (interval if at_once else 0.0)

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(f"  {message}", file=sys.stderr, flush=True)


class ProgressBar:
    """``done`` of ``total``: a bar redrawn in place on a terminal; elsewhere (logs, make)
    a line per quarter."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.quarter = -1

    def __call__(self, done: int) -> None:
        total = self.total
        if sys.stderr.isatty():
            width = 30
            filled = int(width * done / total) if total else width
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                end="",
                file=sys.stderr,
            )
            return
        quarter = 4 * done // total if total else 4
        if quarter > self.quarter:
            self.quarter = quarter
            print(f"  {done}/{total} done", file=sys.stderr)
