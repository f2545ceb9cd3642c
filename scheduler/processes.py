"""Child processes that announce themselves on stdout (``moe-scheduler serve`` and
``emulate``, SGLang's router): started with stdout and stderr in log files, waited for
by a pattern in their stdout, stopped with SIGTERM and, after a grace, SIGKILL. The
wait polls the log file, so its deadline holds even when the child prints nothing."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.errors import MoeSchedulerError

#: How long a child may take to print its ready line.
STARTUP_TIMEOUT_S = 120.0


class ChildFailed(MoeSchedulerError):
    """A child process exited, or did not get ready in time."""


@dataclass
class Child:
    """A started child; ``out`` / ``err``: its stdout and stderr log files. ``address``
    and ``extra``: what its ready lines said (its URL, other endpoints)."""

    name: str
    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    address: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, pattern: str, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        """The first group of ``pattern``'s first match in stdout, once printed;
        ChildFailed (with the end of stderr) if the child exits or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        compiled = re.compile(pattern)
        while True:
            match = compiled.search(self.out.read_text(errors="replace"))
            if match:
                return match.group(1)
            exited = self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                self.stop()
                why = "exited" if exited else f"was not ready after {timeout_s:.0f} s"
                tail = self.err.read_text(errors="replace")[-2000:]
                raise ChildFailed(f"{self.name} {why}; see {self.err}:\n{tail}")
            time.sleep(0.05)

    def stop(self, grace_s: float = 15.0) -> int | str:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit status, or "killed"."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return "killed"
        return self.process.returncode


def spawn(name: str, argv: list[str], log_dir: Path, cwd: Path | None = None) -> Child:
    """Start ``argv`` with stdout and stderr in ``log_dir/<name>.out`` and ``.err``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out.open("wb") as o, err.open("wb") as e:
        process = subprocess.Popen(argv, cwd=cwd, stdout=o, stderr=e, start_new_session=True)
    return Child(name, process, out, err)
