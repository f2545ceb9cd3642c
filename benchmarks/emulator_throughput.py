"""Benchmark: requests per second the SGLang emulator sustains over real HTTP.

Starts ``moe-scheduler emulate`` as its own process on 127.0.0.1 (port 0, read back from
its startup line) and drives it from this process with a minimal keep-alive HTTP/1.1
load generator (raw asyncio streams, ``--concurrency`` connections, each sending its
next request when the previous answer is in). Both share this machine's cores, so the
generator's own CPU time is measured and reported beside the server's.

Scenarios (short prompts, 16 completion tokens, 2 nodes x 8 GPUs of DeepSeek-V2-Lite):

- ``plain``: non-streaming, no routed experts, ``--time-scale 0`` (the emulator's own
  cost: HTTP, JSON, classification, per-request routing draw and cost model);
- ``routed_experts``: the same with ``return_routed_experts`` (every token's routing
  drawn and base64-encoded);
- ``stream``: streaming (17 SSE events per request), ``--time-scale 0``;
- ``modelled_time``: non-streaming at ``--time-scale 1``: requests take their modelled
  latency, so throughput is bounded by concurrency / latency, as on a real cluster.

The emulator's throughput target is >= 2,000 short non-streaming requests/s (scenario
``plain``).

Usage::

    python -m benchmarks.emulator_throughput [--seconds 5] [--concurrency 64]
        [--out benchmarks/results/emulator.json]

Failures are recorded in the JSON (status "error" and a message), not raised.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import re
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_facts

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
TARGET_RPS = 2000
MAX_NEW_TOKENS = 16
CLUSTER = ["--nodes", "2", "--gpus-per-node", "8", "--model", "deepseek-v2-lite"]
SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {"time_scale": 0.0, "stream": False, "routed": False},
    "routed_experts": {"time_scale": 0.0, "stream": False, "routed": True},
    "stream": {"time_scale": 0.0, "stream": True, "routed": False},
    "modelled_time": {"time_scale": 1.0, "stream": False, "routed": False},
}


def _eprint(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    return machine_facts("numpy", "aiohttp")


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def short_prompts(data: Path | None, per_domain: int = 64) -> tuple[list[str], str]:
    """Short real prompts (< 120 characters) from the corpus, else generated ones."""
    prompts: list[str] = []
    if data is not None:
        for domain in ("code", "math", "chat", "general"):
            path = data / "prompts" / domain / f"{domain}_prompts.jsonl.gz"
            if not path.is_file():
                continue
            taken = 0
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    text = json.loads(line)["prompt"]
                    if len(text) < 120:
                        prompts.append(text)
                        taken += 1
                        if taken == per_domain:
                            break
    if prompts:
        return prompts, f"{len(prompts)} short corpus prompts (< 120 characters)"
    generated = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(4 * per_domain)]
    return generated, f"{len(generated)} generated short prompts (no corpus found)"


# --------------------------------------------------------------------------- load generator


def _request_bytes(port: int, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response (Content-Length or chunked); returns (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = bytearray()
    while True:  # chunked transfer encoding
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, bytes(body)
        body += chunk[:-2]


async def _connection(
    port: int, requests: list[bytes], start: int, stop_at: float, out: dict[str, Any]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = start
    try:
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status, body = await _read_response(reader)
            out["latencies"].append(time.perf_counter() - sent)
            if status != 200:
                out["errors"] += 1
            elif out["checked"] < 50 and i % 97 == 0:  # spot-check the payload
                text = body.decode()
                last = text if not text.startswith("data:") else text.split("data: ")[-2]
                assert '"dp_rank"' in last, last[:200]
                out["checked"] += 1
            i += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def _drive(
    port: int, requests: list[bytes], seconds: float, concurrency: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies": [], "errors": 0, "checked": 0}
    stop_at = time.perf_counter() + seconds
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(
        *(_connection(port, requests, c * 7, stop_at, out) for c in range(concurrency))
    )
    out["seconds"] = time.perf_counter() - wall0
    out["client_cpu_s"] = time.process_time() - cpu0
    return out


# --------------------------------------------------------------------------- scenarios


def _start_server(time_scale: float, capacity: int, data: Path | None) -> tuple[Any, int]:
    command = [sys.executable, "-m", "scheduler", "emulate", *CLUSTER]
    command += ["--init-expert-location", "trivial", "--port", "0", "--capacity", str(capacity)]
    command += ["--time-scale", str(time_scale)]
    command += ["--data", str(data)] if data is not None else ["--no-data"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)\n", line)
    if not match:
        process.kill()
        _, err = process.communicate()
        raise RuntimeError(f"emulator did not start: {line!r} {err[-2000:]}")
    return process, int(match.group(1))


def run_scenario(
    name: str,
    spec: dict[str, Any],
    prompts: list[str],
    seconds: float,
    concurrency: int,
    capacity: int,
    data: Path | None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "scenario": name,
        "concurrency": concurrency,
        "capacity_per_rank": capacity,
        "max_new_tokens": MAX_NEW_TOKENS,
        **spec,
    }
    process = None
    try:
        process, port = _start_server(spec["time_scale"], capacity, data)
        bodies = [
            {
                "text": p,
                "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS},
                "stream": spec["stream"],
                "return_routed_experts": spec["routed"],
            }
            for p in prompts
        ]
        requests = [_request_bytes(port, b) for b in bodies]
        asyncio.run(_drive(port, requests, min(1.0, seconds), concurrency))  # warm-up
        server_cpu0 = _cpu_seconds(process.pid)
        result = asyncio.run(_drive(port, requests, seconds, concurrency))
        server_cpu1 = _cpu_seconds(process.pid)
        n = len(result["latencies"])
        latencies = sorted(result["latencies"])
        server_cpu = None
        if server_cpu0 is not None and server_cpu1 is not None:
            server_cpu = server_cpu1 - server_cpu0
        record.update(
            status="ok" if result["errors"] == 0 else "error",
            requests=n,
            errors=result["errors"],
            seconds=round(result["seconds"], 3),
            requests_per_s=round(n / result["seconds"], 1),
            latency_ms={
                q: round(1e3 * latencies[min(n - 1, int(f * n))], 3)
                for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            },
            client_cpu_s=round(result["client_cpu_s"], 3),
            client_cpu_us_per_request=round(1e6 * result["client_cpu_s"] / n, 1),
            server_cpu_s=None if server_cpu is None else round(server_cpu, 3),
            server_cpu_us_per_request=(
                None if server_cpu is None else round(1e6 * server_cpu / n, 1)
            ),
        )
        if result["errors"]:
            record["message"] = f"{result['errors']} non-200 responses"
    except Exception as e:  # recorded as data
        record.update(status="error", message=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                _, err = process.communicate(timeout=30)
                record["server_exit_code"] = process.returncode
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                record["server_exit_code"] = "killed"
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=64, help="open connections")
    parser.add_argument("--capacity", type=int, default=64, help="running requests per rank")
    parser.add_argument("--data", type=Path, default=None, help="real data (../shared/data)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "emulator.json")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    args = parser.parse_args(argv)
    data = args.data
    if data is None:
        env = os.environ.get("MOE_SCHEDULER_DATA")
        data = Path(env) if env else ROOT.parent / "shared" / "data"
    data = data.resolve() if data.is_dir() else None
    prompts, prompt_note = short_prompts(data)
    # other work on the machine competes for the same cores: record how busy it was
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    records = []
    for name in args.scenario or list(SCENARIOS):
        _eprint(f"emulator benchmark: {name} ({args.seconds:g} s, {args.concurrency} connections)")
        record = run_scenario(
            name, SCENARIOS[name], prompts, args.seconds, args.concurrency, args.capacity, data
        )
        _eprint(f"  {record.get('requests_per_s')} requests/s, status {record['status']}")
        records.append(record)
    plain = next((r for r in records if r["scenario"] == "plain" and r["status"] == "ok"), None)
    result = {
        "benchmark": "emulator",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.emulator_throughput", *(sys.argv[1:] if argv is None else argv)]
        ),
        "cluster": " ".join(CLUSTER) + " --init-expert-location trivial",
        "data": "real data (profile from ESFT traces, classes from the prompt corpus)"
        if data is not None
        else "no data: shipped default profile",
        "prompts": prompt_note,
        "target_requests_per_s": TARGET_RPS,
        "meets_target": None if plain is None else plain["requests_per_s"] >= TARGET_RPS,
        "load_generator": "this process: raw asyncio keep-alive HTTP/1.1, one request in "
        "flight per connection; shares the machine's cores with the server",
        "machine": _machine(),
        "load_average_at_start": load_at_start,
        "scenarios": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _eprint(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
