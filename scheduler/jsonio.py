"""JSON files in and out: one place that maps read errors to InputError and writes
atomically (a temporary file beside the target, renamed over it when complete)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from scheduler.errors import InputError


def read_json(path: Path) -> Any:
    """Decoded JSON of ``path``; InputError naming the file for anything unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from e


def write_json_atomic(path: Path, data: Any, *, indent: int | None = None) -> None:
    """Write ``data`` as JSON; readers never see a partial file. ``indent=None`` is compact."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    separators = (",", ":") if indent is None else None
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, separators=separators)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
