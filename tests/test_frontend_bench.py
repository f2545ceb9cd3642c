"""Smoke test of benchmarks/frontend.py: its quick mode runs end to end against real
servers (emulator and scheduler processes, and SGLang's router where installed) and its
result renders."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from tests.conftest import REPO, render_results


def test_frontend_benchmark_quick(shared_data, tmp_path):
    out = tmp_path / "results" / "frontend.json"
    command = [
        sys.executable, "-m", "benchmarks.frontend", "--quick",
        "--data", str(shared_data), "--out", str(out), "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "frontend" and result["quick"] is True

    latency = result["latency"]
    assert {r["path"] for r in latency} == {"direct", "scheduler"}
    for r in latency:
        assert r["status"] == "ok", r
        assert r["requests"] > 0 and r["latency_ms"]["p50"] > 0
    scheduled = [r for r in latency if r["path"] == "scheduler"]
    assert all("added_ms" in r and "meets_target" in r for r in scheduled)
    # the OpenAI path: /v1/chat/completions to the emulator and to the scheduler's listener
    ours = {("direct", "generate"), ("scheduler", "grpc"), ("direct", "openai"),
            ("scheduler", "openai")}  # fmt: skip
    assert {(r["path"], r["api"]) for r in latency} == ours

    throughput = result["throughput"]
    rows = {(r["path"], r["api"]) for r in throughput}
    if importlib.util.find_spec("sglang_router") is None:
        # CI installs only the dev and torch extras: the router part is skipped, with why
        assert rows == ours
        assert "not importable" in result["router_note"]
    else:
        # the router in front of the same emulator, both APIs, compared with ours
        assert rows == ours | {("sglang_router", "generate"), ("sglang_router", "openai")}
        assert "/v1/chat/completions" in result["router_openai_note"]
        for r in throughput:
            if r["path"] == "scheduler":
                assert r["vs_router"]["requests_per_s"] > 0, r
    assert all(r["status"] == "ok" and r["requests_per_s"] > 0 for r in throughput)

    prediction = {r["prediction"]: r for r in result["prediction"]}
    assert {"none", "probe"} <= set(prediction)
    assert all(r["status"] == "ok" for r in prediction.values())
    # a probe is one extra backend request per request; none sends just the request
    assert prediction["none"]["backend_requests_per_request"] == 1.0
    assert prediction["probe"]["backend_requests_per_request"] == 2.0
    assert prediction["probe"]["inter_node_bytes_per_token"] > 0

    md = tmp_path / "RESULTS.md"
    text = render_results(out.parent, md)
    assert "## Scheduler front-end (`frontend`)" in text and "Quick mode" in text
    assert "The OpenAI path (`/v1/chat/completions`), same run:" in text
