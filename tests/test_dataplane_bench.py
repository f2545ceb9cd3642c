"""Smoke test of benchmarks/dataplane.py: its quick mode runs every soak and fault
scenario end to end against real processes (emulator and scheduler), writes the
reconciliation as data and renders. The targets themselves are the benchmark's verdict,
not this test's."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, render_results

SCENARIOS = ["cancel_deadline", "stream_length", "overload", "soak", "backend_restart"]


def test_dataplane_benchmark_quick(shared_data, tmp_path):
    out = tmp_path / "results" / "dataplane.json"
    command = [
        sys.executable, "-m", "benchmarks.dataplane", "--quick",
        "--data", str(shared_data), "--out", str(out), "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "dataplane" and result["quick"] is True
    assert [s["scenario"] for s in result["scenarios"]] == SCENARIOS
    by_name = {s["scenario"]: s for s in result["scenarios"]}
    for s in result["scenarios"]:
        assert s["status"] == "ok", s.get("message")
        assert s["calls"] > 0 and sum(s["client_outcomes"].values()) == s["calls"]
        assert s["targets"] and all(t["pass"] in (True, False, None) for t in s["targets"])
        assert s["pass"] in (True, False, None)
        recon = s["reconciliation"]
        assert isinstance(recon["counters_match"], bool) and recon["by_status"]
        assert recon["emulator_served"] >= 0 and not recon["read_errors"]
        # every call of the client appears in the reconciliation, whatever the server counted
        assert sum(r["client"] for r in recon["by_status"]) == s["calls"]

    assert by_name["cancel_deadline"]["by_role"]["cancel"]
    rows = by_name["stream_length"]["lengths"]
    assert [(r["concurrency"], r["max_new_tokens"]) for r in rows] == [
        (c, n) for c in (1, 4) for n in (32, 128, 512)
    ]  # each length alone, then --quick's 4 at a time
    assert all(r["chunks"] > 0 for r in by_name["stream_length"]["lengths"])
    assert by_name["overload"]["capacity_rps"] > 0
    assert by_name["overload"]["offered_rps"] > by_name["overload"]["capacity_rps"]
    soak = by_name["soak"]
    assert len(soak["intervals"]) == 2 and all(i["rss_mib"] for i in soak["intervals"])
    events = by_name["backend_restart"]["events"]
    assert events["kill_s"] < events["spawn_s"] < events["ready_s"]

    md = tmp_path / "RESULTS.md"
    text = render_results(out.parent, md)
    assert "## Data plane: soak and faults (`dataplane`)" in text and "Quick mode" in text
    assert "### Reconciliation" in text and "### Backend restart" in text
