"""`moe-scheduler demo` end to end on a tiny run: real processes, real prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.cli import main
from scheduler.emulator.workload import DEFAULT_PROFILE
from scheduler.server.demo import DEMO_BALANCES, OPENAI_CHATS, PD_NAME
from tests.server_harness import write_bundle, write_placement


def test_demo_runs_both_policies_then_prefill_decode_and_cleans_up(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    placement = write_placement(tmp_path / "placement", 2, 2)
    bundle = write_bundle(tmp_path / "bundle.npz")
    out = tmp_path / "serving"
    argv = [
        "demo",
        "--data",
        str(shared_data),
        "--placement",
        str(placement),
        "--profile",
        str(DEFAULT_PROFILE),
        "--bundle",
        str(bundle),
        "--out",
        str(out),
        "--requests",
        "30",
        "--rate",
        "100",
        "--time-scale",
        "0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "OpenAI front door" in printed  # the last mixed run also served chats
    assert printed.count("  ok: ") == OPENAI_CHATS
    results = json.loads((out / "serving.json").read_text())
    # round_robin, ours at each setting, then ours on a prefill + decode pair
    assert len(results) == 2 + len(DEMO_BALANCES)
    assert all(any(f"balance {b:g}" in name for name in results) for b in DEMO_BALANCES)
    for result in results.values():
        assert result["statuses"] == {"OK": 30}
        assert result["inter_node_bytes_per_token"] > 0
    legs = {row["leg"]: row for row in results[PD_NAME]["legs"]}
    assert legs["prefill"]["instances"] == ["prefill"] and legs["decode"]["instances"] == ["decode"]
    for row in legs.values():  # both legs of every request, each served once
        assert row["requests"] == row["served_by_emulator"] == 30
    assert legs["decode"]["prefill_rank_honoured"] == 30
    report = (out / "serving.md").read_text()
    assert "inter-node bytes per token" in report and "| prefill | prefill |" in report
