"""Smoke test of benchmarks/policy_grid_production.py: its --quick grid runs end to end on
the real data, every record is ok and labelled resampled, the bounds sit below every
policy's time, and the result renders with its headline table (not numbers)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, render_results


def test_policy_grid_production_quick(shared_data, tmp_path):
    out = tmp_path / "results" / "policy_grid_production.json"
    command = [
        sys.executable, "-m", "benchmarks.policy_grid_production", "--quick",
        "--data", str(shared_data), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "policy_grid_production" and result["quick"] is True
    assert result["machine"]["cpu_count"] >= 1
    records = result["records"]
    assert records and all(r["status"] == "ok" for r in records), [
        r for r in records if r["status"] != "ok"
    ]
    figures = {d["name"]: d["figures"] for d in result["datasets"]}
    assert figures == {
        "esft-heldout": "resampled real",
        "deepseek-v3-synthetic": "resampled synthetic",
    }
    assert all(r["figures"] == figures[r["dataset"]] for r in records)
    assert {r["phase"] for r in records} == {"decode", "prefill"}
    combos = {(r["method"], r["policy"]) for r in records}
    assert {("ours", "locality_window"), ("trivial", "round_robin"), ("eplb", "round_robin")} <= (
        combos
    )
    assert {("oracle", "locality_window"), ("ours", "locality_window[balance=0]")} <= combos
    for r in records:
        # a proven lower bound over every assignment, on the record's placement (prefill:
        # round_robin's steps, so only that run is held to it exactly; the oracle
        # placement runs locality_window only, so it has no prefill bound)
        bound = r["bound_moe_layer_time_us_mean"]
        if r["method"] == "oracle" and r["phase"] == "prefill":
            assert bound is None
            continue
        assert bound is not None and bound > 0
        if r["phase"] == "decode" or r["policy"] == "round_robin":
            assert bound <= r["moe_layer_time_us_mean"] + 1e-9, r
        parts = r["latency_us_mean"] + r["bytes_us_mean"] + r["expert_us_mean"]
        assert abs(parts - r["moe_layer_time_us_mean"]) < 1e-6 * parts
    for r in records:  # decode: the same tokens for every combination of a case and point
        same = [
            q["tokens"]
            for q in records
            if (q["dataset"], q["nodes"], q["redundant_experts"], q["point"])
            == (r["dataset"], r["nodes"], r["redundant_experts"], r["point"])
        ]
        if r["phase"] == "decode":
            assert set(same) == {r["tokens"]}
    for case in result["cases"]:
        points = case["small_batch"]["points"]
        assert "decode_8" in points and "decode_128" in points
        assert (
            points["decode_8"]["moe_layer_time_us_mean"]
            < (points["decode_128"]["moe_layer_time_us_mean"])
        )

    md = tmp_path / "RESULTS.md"
    (out.parent / "other.json").write_text(json.dumps({"benchmark": "accounting"}))
    text = render_results(out.parent, md)
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert "policy_grid_production" in sections[0]  # leads RESULTS.md
    assert "QUICK RUN" in text and "SYNTHETIC, resampled" in text and "real, resampled" in text
    assert "bound: any scheduler, on ours' placement" in text
    assert "SGLang default (`trivial` + `round_robin`)" in text and "best peer" in text
    assert "latency vs bytes vs expert weights" in text
