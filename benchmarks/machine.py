"""Facts about the machine a benchmark ran on, recorded beside its numbers."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def machine_facts(*packages: str) -> dict[str, Any]:
    """CPU count and model, memory, Python, platform, and the versions of ``packages``
    (keys with ``-`` turned into ``_``, e.g. ``scikit_learn``)."""
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts[package.replace("-", "_")] = metadata.version(package)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory_total_mib"] = round(int(line.split()[1]) / 1024)
                break
    except OSError:
        pass
    return facts
