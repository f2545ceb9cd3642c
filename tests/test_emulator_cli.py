"""``moe-scheduler emulate``: startup on port 0, failure flag, SIGTERM, input errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from scheduler.cli import main
from tests.emulator_harness import STARTUP_TIMEOUT_S, connection_fate, get, post, wait_for_fate

BASE = ["emulate", "--nodes", "1", "--gpus-per-node", "2", "--model", "deepseek-v2-lite"]


def test_emulate_prints_its_port_serves_and_stops_on_sigterm():
    options = "--init-expert-location trivial --port 0 --no-data --rank-mode 1=fail"
    options += " --gpu h200 --expert-weights bf16 --inter-node-gbps 25"
    command = [sys.executable, "-m", "scheduler", *BASE, *options.split()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the socket is bound
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        url = match.group(1)
        assert int(match.group(2)) > 0
        assert get(url + "/health")[0] == 200
        status, body = post(url + "/generate", {"text": "hi", "routed_dp_rank": 0})
        assert status == 200 and body["meta_info"]["dp_rank"] == 0
        info = get(url + "/server_info")[1]
        assert info["emulator"]["profile"].startswith("shipped default")
        assert info["version"] == "0.5.23" and info["disaggregation_mode"] == "null"
        cost = info["emulator"]["cost_model"]  # the accounting's CostModel, as JSON
        assert cost["gpu"]["name"] == "H200" and cost["gpu"]["hbm_gbps"] == 4800
        assert (cost["expert_weights"], cost["inter_node_gbps"]) == ("bf16", 25)
        # pinned to the failed rank: SGLang's DP controller raises and the server goes down
        assert connection_fate(url + "/generate", {"text": "hi", "routed_dp_rank": 1}) == "reset"
        wait_for_fate(url + "/health", "refused")
        process.send_signal(signal.SIGTERM)  # the process itself still stops cleanly
        _, err = process.communicate(timeout=STARTUP_TIMEOUT_S)
        assert process.returncode == 0, err
        assert "DP rank 1 is not active" in err and "stays down" in err
        assert "emulator stopped" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_emulate_api_key_is_required_on_the_api_and_never_printed():
    key = "s3cret-k3y-for-the-cli-test"
    options = f"--init-expert-location trivial --port 0 --no-data --api-key {key}"
    command = [sys.executable, "-m", "scheduler", *BASE, *options.split()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        url = match.group(1)
        assert get(url + "/health")[0] == 200
        assert post(url + "/generate", {"text": "hi"}) == (401, {"error": "Unauthorized"})
        assert get(url + "/admin/ranks") == (401, {"error": "Unauthorized"})
        request = urllib.request.Request(
            url + "/generate",
            data=json.dumps({"text": "hi"}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=STARTUP_TIMEOUT_S) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=STARTUP_TIMEOUT_S)
        assert process.returncode == 0, err
        assert "API key required" in err
        assert key not in line + out + err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_emulate_prefill_prints_its_bootstrap_port_before_listening():
    options = "--init-expert-location trivial --port 0 --no-data --role prefill"
    options += " --disaggregation-bootstrap-port 0 --sglang-version 0.5.9"
    command = [sys.executable, "-m", "scheduler", *BASE, *options.split()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        boot = re.fullmatch(r"bootstrap listening on 127\.0\.0\.1:(\d+)\n", first)
        listening = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", second)
        assert boot and listening, (first, second)
        url, port = listening.group(1), int(boot.group(1))
        info = get(url + "/server_info")[1]
        assert (info["disaggregation_mode"], info["disaggregation_bootstrap_port"]) == (
            "prefill",
            port,
        )
        assert info["version"] == "0.5.9" and info["load_balance_method"] == "follow_bootstrap_room"
        assert get(f"http://127.0.0.1:{port}/health") == (200, "OK")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=STARTUP_TIMEOUT_S)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_emulate_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["emulate", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--init-expert-location" in out and "DRAWN" in out
    assert "--api-key" in out and "Bearer" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--init-expert-location", "{MISSING}"], "does not exist"),
        (["--init-expert-location", "{BAD}"], "one row per hidden layer"),
        (["--init-expert-location", "trivial", "--ep-num-redundant-experts", "1"], "not divisible"),
        (["--init-expert-location", "trivial", "--capacity", "0"], "--capacity"),
        (["--init-expert-location", "trivial", "--seed", "-1"], "--seed"),
        (["--init-expert-location", "trivial", "--rank-mode", "5=fail"], "--rank-mode"),
        (["--init-expert-location", "trivial", "--default-class", "poetry"], "--default-class"),
        (["--init-expert-location", "trivial", "--model", "deepseek-v3"], "--profile"),
        (["--init-expert-location", "trivial", "--api-key", "has space"], "--api-key"),
        (["--init-expert-location", "trivial", "--gpu", "A100"], "--gpu 'A100' is not one of H100"),
        (["--init-expert-location", "trivial", "--expert-weights", "int4"], "fp8, bf16"),
        (["--init-expert-location", "trivial", "--inter-node-gbps", "0"], "--inter-node-gbps"),
        (["--init-expert-location", "trivial", "--intra-node-gbps", "nan"], "--intra-node-gbps"),
        (["--init-expert-location", "trivial", "--sglang-version", "latest"], "--sglang-version"),
        (
            ["--init-expert-location", "trivial", "--load-balance-method", "follow_bootstrap_room"],
            "--role prefill or decode",
        ),
        (["--init-expert-location", "trivial", "--kv-timeout", "0"], "--kv-timeout"),
        (
            ["--init-expert-location", "trivial", "--disaggregation-bootstrap-port", "70000"],
            "--disaggregation-bootstrap-port",
        ),
    ],
)
def test_emulate_input_errors_are_one_line_exit_2(tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"physical_to_logical_map": [[0, 1]]}))
    extra = [
        e.replace("{MISSING}", str(tmp_path / "missing.json")).replace("{BAD}", str(bad))
        for e in extra
    ]
    assert main([*BASE, "--no-data", "--port", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-scheduler: error: ") and message in err
    if str(bad) in extra:
        assert str(bad) in err  # the message names the file
