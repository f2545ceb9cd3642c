"""docs/server.md's configuration reference is checked against the configuration
dataclasses: every key is documented, with the code's default, and nothing else."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from scheduler.server.config import _SECTIONS, InstanceSection

DOC = Path(__file__).resolve().parent.parent / "docs" / "server.md"
#: Keys without a default: the example shows a value.
REQUIRED = {("backend", "url"), ("cluster", "placement")}


def _blocks() -> list[dict[str, object]]:
    return [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.S)]


def test_every_configuration_key_is_documented_with_its_default() -> None:
    documented = _blocks()[0]
    assert set(documented) == set(_SECTIONS)
    for section, cls in _SECTIONS.items():
        keys = {f.name for f in dataclasses.fields(cls)}
        shown = documented[section]
        assert isinstance(shown, dict)
        assert set(shown) == keys, f"[{section}]: {set(shown) ^ keys}"
        defaults = cls()
        for key, value in shown.items():
            default = getattr(defaults, key)
            if (section, key) in REQUIRED or default is None or isinstance(default, Path | dict):
                continue  # files, tables and required keys: the example shows a value
            assert value == default, f"{section}.{key}: docs say {value!r}, code {default!r}"


def test_every_instance_key_is_documented() -> None:
    tables = next(b for b in _blocks() if "instances" in b.get("backend", {}))["backend"]
    shown = {key for table in tables["instances"] for key in table}  # type: ignore[index]
    keys = {f.name for f in dataclasses.fields(InstanceSection)}
    text = DOC.read_text()
    for key in keys - shown:  # not in the example: described in the text
        assert f"`{key}`" in text, key
    assert shown <= keys
