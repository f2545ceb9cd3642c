"""Formatting helpers shared by the benchmark section renderers."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Renderer = Callable[[dict[str, Any], Path], list[str]]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _machine_line(machine: dict[str, Any]) -> str:
    parts = []
    if machine.get("cpu_model"):
        parts.append(str(machine["cpu_model"]))
    if machine.get("cpu_count") is not None:
        usable = machine.get("cpus_usable")
        cpus = f"{machine['cpu_count']} CPUs"
        if usable is not None and usable != machine["cpu_count"]:
            cpus += f" ({usable} usable)"
        parts.append(cpus)
    if machine.get("memory_total_mib") is not None:
        parts.append(f"{machine['memory_total_mib'] / 1024:.0f} GiB RAM")
    for key, name in (("python", "Python"), ("numpy", "NumPy"), ("scikit_learn", "scikit-learn")):
        if machine.get(key):
            parts.append(f"{name} {machine[key]}")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    return "Machine: " + ", ".join(parts) + "." if parts else "Machine: not recorded."


def _command(data: dict[str, Any], default: str = "") -> str:
    """The command a result records, in the form that runs today: results written before
    the benchmarks became a package say ``python benchmarks/NAME.py``, which is the same
    run as ``python -m benchmarks.NAME`` (same arguments)."""
    command = str(data.get("command", default))
    return re.sub(r"python benchmarks/(\w+)\.py", r"python -m benchmarks.\1", command)
