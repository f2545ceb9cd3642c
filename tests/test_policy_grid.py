"""Smoke test of benchmarks/policy_grid.py: its --quick grid runs end to end on the real
data, every record is ok, and the result renders (a smoke test, not numbers)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_policy_grid_quick(shared_data, tmp_path):
    out = tmp_path / "results" / "policy_grid.json"
    command = [
        sys.executable, "-m", "benchmarks.policy_grid", "--quick",
        "--data", str(shared_data), "--out", str(out), "--figures", str(tmp_path / "figures"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "policy_grid" and result["quick"] is True
    records = result["records"]
    assert {r["dataset"] for r in records} == {
        "esft-heldout",
        "deepseek-v3-synthetic",
        "synthetic-100k",
    }
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    assert {r["policy"] for r in records} >= {"round_robin", "locality_window"}
    assert len({r["seed"] for r in records}) >= 2
    synthetic = {d["name"]: d["synthetic"] for d in result["datasets"]}
    assert synthetic == {
        "esft-heldout": False,
        "deepseek-v3-synthetic": True,
        "synthetic-100k": True,
    }
    for r in records:  # the same requests and tokens for every combination of a case
        same = [
            q
            for q in records
            if (q["dataset"], q["nodes"], q["redundant_experts"], q["seed"])
            == (r["dataset"], r["nodes"], r["redundant_experts"], r["seed"])
        ]
        assert {q["tokens"] for q in same} == {r["tokens"]}
    assert all(s["warm_ms_median"] > 0 for s in result["window_solve"])
    assert (tmp_path / "figures" / "policy_grid_traffic.png").stat().st_size > 0

    render = (
        "import json, pathlib;"
        "from benchmarks.renderers import RENDERERS;"
        f"p = pathlib.Path({str(out)!r});"
        "print('\\n'.join(RENDERERS['policy_grid'](json.loads(p.read_text()), p)))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", render], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "QUICK RUN" in shown.stdout and "SYNTHETIC" in shown.stdout
    assert "Ours vs SGLang default vs best peer" in shown.stdout
