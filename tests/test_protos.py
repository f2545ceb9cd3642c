"""The committed generated gRPC code matches protos/ (regenerate with `make protos`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "scheduler/api/v1/scheduler.proto"
GENERATED = ("scheduler_pb2.py", "scheduler_pb2.pyi", "scheduler_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            PROTO,
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "scheduler/api/v1" / name).read_text()
        committed = (ROOT / "scheduler/api/v1" / name).read_text()
        assert fresh == committed, f"scheduler/api/v1/{name} is stale: run `make protos`"
