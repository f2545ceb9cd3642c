"""The package layering: no import cycle, the algorithmic core imports without any
network code, and the production server without the emulator (its test double)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "scheduler"
#: The algorithmic core: pure, importable without gRPC, HTTP or the server.
PURE = (
    "accounting",
    "analysis",
    "placement",
    "policies",
    "prediction",
    "simulation",
    "traces",
    "class_map",
    "errors",
    "jsonio",
    "model_shape",
    "profile",
    "progress",
    "sglang_versions",
)
NETWORK = ("grpc", "grpc_health", "grpc_reflection", "aiohttp", "scheduler.api")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "v1" and path.parent.parent.name == "api":
            continue  # generated
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The scheduler modules ``name`` imports, anywhere in its body (a function-level
    import closes a cycle as surely as a top-level one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def _import_with_blocked(packages: list[str], blocked: tuple[str, ...]) -> None:
    """Import every module of ``packages`` in a fresh interpreter where importing any of
    ``blocked`` (or a submodule) raises ImportError."""
    modules = sorted(
        name
        for name in _modules()
        if any(name == f"scheduler.{p}" or name.startswith(f"scheduler.{p}.") for p in packages)
    )
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        BLOCKED = {blocked!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"{{name}} is blocked: a layer break")
                return None

        sys.meta_path.insert(0, Block())
        for name in {modules!r}:
            importlib.import_module(name)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_core_imports_without_network_code() -> None:
    blocked = (*NETWORK, "scheduler.server", "scheduler.client", "scheduler.emulator")
    _import_with_blocked(list(PURE), blocked)
    # Nor does it import them lazily, except a package's command line (``*.cli``), which
    # composes the layers (``place --from-server`` asks the client for the profile).
    modules = _modules()
    for name, path in modules.items():
        pure = any(name == f"scheduler.{p}" or name.startswith(f"scheduler.{p}.") for p in PURE)
        if pure and not name.endswith(".cli"):
            layered = {t for t in _imports(name, path, modules) if t.startswith(blocked)}
            assert not layered, f"{name} imports {sorted(layered)}"
            source = path.read_text(encoding="utf-8")
            assert not any(f"import {n}" in source for n in NETWORK[:4]), name


def test_the_server_imports_without_the_emulator() -> None:
    _import_with_blocked(["server"], ("scheduler.emulator",))
