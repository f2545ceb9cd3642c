"""JSON files in and out: one place that maps read errors to InputError, reads JSON
lines (plain, ``.gz`` or ``.xz``) and writes atomically (a temporary file beside the
target, renamed over it when complete)."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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


def open_text(path: Path) -> IO[str]:
    """Open a text file, transparently decompressing ``.gz`` and ``.xz``."""
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        if path.name.endswith(".xz"):
            return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(path, f"cannot open ({e.strerror or e})") from e


#: Exceptions that mean "this compressed or text file is damaged".
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError)


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded JSON value) for every non-blank line of a JSON-lines file.

    Bad JSON or a damaged file raises InputError naming the file and the line.
    """
    n = 0
    with open_text(path) as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(
                        path, f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
                    ) from e
        except READ_ERRORS as e:
            raise InputError(path, f"line {n + 1}: cannot read ({e})") from e
