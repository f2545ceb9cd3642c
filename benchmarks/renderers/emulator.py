"""RESULTS.md section for the ``emulator`` benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table


def render_emulator(data: dict[str, Any], source: Path) -> list[str]:
    target = data.get("target_requests_per_s")
    lines = [
        "## SGLang emulator throughput (`emulator`)",
        "",
        f"`moe-scheduler emulate {data.get('cluster', '')}` in its own process, driven over "
        f"real HTTP on loopback; {data.get('data', '')}; {data.get('prompts', '')}. "
        f"Target: at least {_fmt(target)} short non-streaming requests/s (`plain`); met: "
        f"**{_fmt(data.get('meets_target'))}**.",
        "",
        "Emulated, not measured on GPUs: routed experts are drawn from real per-class "
        "profiles and latency comes from the emulator's cost model (docs/emulator.md). "
        f"Load generator: {data.get('load_generator', 'not recorded')}; its CPU time is "
        "shown per request beside the server's.",
        "",
    ]
    rows = []
    for s in data.get("scenarios", []):
        latency = s.get("latency_ms") or {}
        options = ", ".join(
            name
            for name, on in (("stream", s.get("stream")), ("routed experts", s.get("routed")))
            if on
        )
        rows.append(
            [
                f"`{s.get('scenario')}`",
                options or "-",
                _fmt(s.get("time_scale"), 0),
                str(s.get("status")),
                _fmt(s.get("requests")),
                _fmt(s.get("requests_per_s"), 0),
                " / ".join(_fmt(latency.get(q), 1) for q in ("p50", "p90", "p99")),
                _fmt(s.get("server_cpu_us_per_request"), 0),
                _fmt(s.get("client_cpu_us_per_request"), 0),
            ]
        )
    lines += _table(
        [
            "scenario",
            "options",
            "time scale",
            "status",
            "requests",
            "requests/s",
            "latency ms p50 / p90 / p99",
            "server CPU us/request",
            "load-generator CPU us/request",
        ],
        rows,
    )
    lines.append("")
    first = (data.get("scenarios") or [{}])[0]
    lines += [
        f"Each scenario: {_fmt(first.get('concurrency'))} keep-alive connections, "
        f"{_fmt(first.get('max_new_tokens'))} completion tokens, capacity "
        f"{_fmt(first.get('capacity_per_rank'))} per rank. Time scale 0 answers at once (the "
        "emulator's own cost); time scale 1 holds each request for its modelled latency, so "
        "that row is bounded by connections / latency, not by the emulator."
    ]
    for s in data.get("scenarios", []):
        if s.get("message"):
            lines.append(f"- `{s.get('scenario')}`: {s['message']}")
    lines += [
        "",
        _machine_line(data.get("machine", {}))
        + f" aiohttp {data.get('machine', {}).get('aiohttp', '?')}."
        + f" Run at {data.get('generated_at', '?')}; load average (1/5/15 min) at start: "
        + " / ".join(_fmt(v, 2) for v in data.get("load_average_at_start") or [])
        + " (other work competes for the same cores).",
        "",
        f"Reproduce: `{_command(data, 'python -m benchmarks.emulator_throughput')}` then "
        "`python -m benchmarks.render`. Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines
