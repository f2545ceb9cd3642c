"""RESULTS.md section for the ``dataplane`` benchmark (soak and faults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table

_TITLES = {
    "cancel_deadline": "cancel and deadline",
    "stream_length": "stream length",
    "overload": "overload",
    "soak": "soak",
    "backend_restart": "backend restart",
}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return _fmt(value)


def _verdict(value: Any) -> str:
    return {True: "**pass**", False: "**FAIL**"}.get(value, "-")


def _outcomes(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in (counts or {}).items()) or "-"


def _targets_cell(rec: dict[str, Any]) -> str:
    parts = []
    for t in rec.get("targets") or []:
        mark = {True: "ok", False: "**no**"}.get(t.get("pass"), "?")
        parts.append(f"{t['name']}: {_value(t.get('measured'))} ({t['target']}, {mark})")
    return "; ".join(parts) or "-"


def _summary(scenarios: list[dict[str, Any]]) -> list[str]:
    rows = []
    for s in scenarios:
        status = str(s.get("status"))
        if s.get("message"):
            status += f": {s['message']}"
        rows.append(
            [
                _TITLES.get(s.get("scenario", ""), str(s.get("scenario"))),
                status,
                _fmt(s.get("calls")),
                _outcomes(s.get("client_outcomes")),
                _targets_cell(s),
                _verdict(s.get("pass")),
                _fmt(s.get("wall_seconds"), 0),
            ]
        )
    return _table(
        ["scenario", "status", "calls", "client outcomes", "measured (target, met)", "verdict",
         "wall s"],
        rows,
    )  # fmt: skip


def _reconciliation(scenarios: list[dict[str, Any]]) -> list[str]:
    rows = []
    for s in scenarios:
        recon = s.get("reconciliation") or {}
        name = _TITLES.get(s.get("scenario", ""), str(s.get("scenario")))
        for r in recon.get("by_status") or []:
            rows.append(
                [
                    name,
                    f"`{r['client_status']}`",
                    ", ".join(f"`{o}`" for o in r.get("scheduler_outcomes") or []) or "(none)",
                    _fmt(r.get("client")),
                    _fmt(r.get("get_stats")),
                    _fmt(r.get("prometheus")),
                    "yes" if r.get("match") else "**no**",
                ]
            )
    lines = _table(
        ["scenario", "client status", "scheduler outcomes", "client", "GetStats", "Prometheus",
         "match"],
        rows,
    )  # fmt: skip
    rows = []
    for s in scenarios:
        recon = s.get("reconciliation") or {}
        if not recon:
            continue
        telemetry = recon.get("telemetry") or {}
        rows.append(
            [
                _TITLES.get(s.get("scenario", ""), str(s.get("scenario"))),
                _fmt((s.get("client_outcomes") or {}).get("OK", 0)),
                _fmt(recon.get("requests_ok")),
                _fmt(recon.get("scheduler_dispatched")),
                _fmt(recon.get("emulator_served")),
                " / ".join(
                    _fmt(telemetry.get(k))
                    for k in ("telemetry_sampled", "telemetry_accounted", "telemetry_dropped")
                ),
                "; ".join(recon.get("mismatches") or []) or "none",
            ]
        )
    lines += [
        "",
        "Served by the backend: the emulator's `finished_reqs` (admitted requests that "
        "completed or were aborted, so cancelled and timed-out calls count too) against the "
        "scheduler's dispatches (retries included) and the calls the client got OK.",
        "",
        *_table(
            ["scenario", "client OK", "scheduler requests_ok", "dispatched", "emulator served",
             "telemetry sampled / accounted / dropped", "mismatches"],
            rows,
        ),
    ]  # fmt: skip
    return lines


def _soak(s: dict[str, Any]) -> list[str]:
    settings = s.get("settings") or {}
    lines = [
        "### Soak, per interval",
        "",
        f"{_fmt(settings.get('rate'), 0)} requests/s offered ({settings.get('arrivals')} "
        f"arrivals; achieved {_fmt(s.get('achieved_send_rps'), 1)}/s, send lag p99 "
        f"{_fmt(s.get('send_lag_ms_p99'), 1)} ms) for {_fmt(settings.get('minutes'), 2)} min "
        f"in intervals of {_fmt(settings.get('interval_s'), 0)} s; "
        f"{_fmt(100 * (settings.get('stream_fraction') or 0), 0)} % streams "
        f"(max_new_tokens {settings.get('stream_max_new_tokens')}), the rest unary "
        f"({settings.get('unary_max_new_tokens')}); "
        f"{_fmt(100 * (settings.get('cancel_fraction') or 0), 0)} % of calls cancelled by "
        f"the client at a random point ({_fmt(s.get('cancels_planned'))} planned; a cancel "
        f"that comes after the answer does nothing); deadline {_fmt(settings.get('deadline_s'), 0)}"
        f" s; scheduler capacity {_fmt(settings.get('capacity_per_rank'))} per rank; emulator "
        "time scale 1. Latency of OK calls sent in the interval (cancelled ones left out); RSS "
        "of the scheduler process at the interval's end and its CPU over it, in brackets "
        "with its worker processes (the target is on the process itself).",
        "",
    ]
    rows = []
    for r in s.get("intervals") or []:
        unary, stream, first = (r.get(k) or {} for k in
                                ("unary_ms", "stream_ms", "stream_first_chunk_ms"))  # fmt: skip
        rows.append(
            [
                _fmt(r.get("interval")),
                _fmt(r.get("calls")),
                _outcomes(r.get("outcomes")),
                f"{_fmt(unary.get('p50'), 0)} / {_fmt(unary.get('p99'), 0)}",
                f"{_fmt(first.get('p50'), 0)} / {_fmt(first.get('p99'), 0)}",
                f"{_fmt(stream.get('p50'), 0)} / {_fmt(stream.get('p99'), 0)}",
                f"{_fmt(r.get('rss_mib'), 1)} ({_fmt(r.get('with_workers_rss_mib'), 1)})",
                f"{_fmt(r.get('scheduler_cpu_share'), 2)} "
                f"({_fmt(r.get('with_workers_cpu_share'), 2)})",
            ]
        )
    lines += _table(
        ["interval", "calls sent", "outcomes", "unary ms p50 / p99",
         "stream first chunk ms p50 / p99", "stream total ms p50 / p99",
         "scheduler RSS MiB (with workers)", "scheduler CPU, cores (with workers)"],
        rows,
    )  # fmt: skip
    growth = s.get("rss_growth_after_first_interval")
    lines += [
        "",
        "RSS growth after the first interval: "
        + ("-" if growth is None else f"{100 * growth:+.1f} %")
        + f"; unary p99 last / first: {_fmt(s.get('unary_p99_last_over_first'), 2)}; stream "
        f"first-chunk p99 last / first: {_fmt(s.get('stream_first_chunk_p99_last_over_first'), 2)}"
        f"; client CPU {_fmt(s.get('client_cpu_s'), 1)} s.",
        "",
    ]
    per_call = s.get("cpu_ms_per_call") or {}
    if per_call:
        lines += [
            "CPU per call of this mix: scheduler "
            f"{_fmt(per_call.get('scheduler'), 2)} ms "
            f"({_fmt(per_call.get('scheduler_with_workers'), 2)} with its workers), emulator "
            f"{_fmt(per_call.get('emulator'), 2)} ms, load generator "
            f"{_fmt(per_call.get('client'), 2)} ms. Scaled to {_fmt(s.get('spec_rate'), 0)} "
            f"requests/s (the issue's soak rate) that is "
            f"**{_fmt(s.get('cores_at_spec_rate'), 1)} cores** for the three "
            f"({_fmt(s.get('scheduler_cores_at_spec_rate'), 1)} for the scheduler process "
            "alone), an upper bound: under load the relay merges tokens while writes back up, "
            "so a call costs less at higher rates. This machine has "
            f"{_fmt(s.get('machine_cores'))} cores, so the soak runs at "
            f"{_fmt(settings.get('rate'), 0)} requests/s, a rate it carries.",
            "",
        ]
    return lines


def _streams(s: dict[str, Any]) -> list[str]:
    settings = s.get("settings") or {}
    lines = [
        "### Stream length",
        "",
        "Streams through the scheduler with routed experts on, each length alone (one "
        "stream at a time) and under a serving load ("
        + ", ".join(str(c) for c in settings.get("concurrency") or [1] if c != 1)
        + " streams at a time), each row repeated to at least "
        f"{_fmt(settings.get('min_chunks_per_row'))} chunks (CPU times in /proc are 10 ms "
        "clock ticks); emulator time scale "
        f"{_fmt(settings.get('time_scale'), 2)} (so the scheduler's background work, "
        f"{_fmt(s.get('idle_scheduler_cpu_ms_per_s'), 1)} ms CPU per s idle, is small per "
        "chunk). CPU per chunk: each process's utime + stime over the streams divided by the "
        "chunks relayed (the final chunk included); target for the scheduler process <= "
        '30 us, flat in length (longest / shortest <= 1.5). "With workers" adds the '
        "scheduler's child processes (telemetry off the event loop), not in the target. "
        "Emulator and client (this process, Python grpc.aio) columns for scale. A stream "
        "alone pays a whole wake-up of the idle event loop, grpc's poller thread included, "
        "for every chunk; with many streams, one wake-up carries the chunks of several "
        '(docs/server.md, "Where the microseconds go").',
        "",
    ]
    rows = [
        [
            _fmt(r.get("concurrency", 1)),
            _fmt(r.get("max_new_tokens")),
            _fmt(r.get("streams")),
            _outcomes(r.get("outcomes")),
            f"{_fmt(r.get('finished'))} / {_fmt(r.get('streams'))}",
            _fmt(r.get("chunks")),
            _fmt(r.get("chunks_per_s"), 0),
            _fmt(r.get("first_chunk_ms_p50"), 1),
            _fmt(r.get("scheduler_cpu_us_per_chunk"), 1),
            _fmt(r.get("scheduler_idle_corrected_us_per_chunk"), 1),
            _fmt(r.get("scheduler_with_workers_cpu_us_per_chunk"), 1),
            _fmt(r.get("emulator_cpu_us_per_chunk"), 1),
            _fmt(r.get("client_cpu_us_per_chunk"), 1),
        ]
        for r in s.get("lengths") or []
    ]
    lines += _table(
        ["streams at a time", "completion tokens", "streams", "outcomes", "finished",
         "chunks", "chunks/s",
         "first chunk ms p50", "scheduler CPU us/chunk", "less idle", "with workers",
         "emulator us/chunk", "client us/chunk"],
        rows,
    )  # fmt: skip
    return [*lines, ""]


def _overload(s: dict[str, Any]) -> list[str]:
    settings = s.get("settings") or {}
    ok = s.get("ok_latency_ms") or {}
    return [
        "### Overload",
        "",
        f"Scheduler capacity {_fmt(settings.get('capacity_per_rank'))} per rank "
        f"({_fmt(settings.get('slots'))} slots), unary calls of "
        f"{_fmt(settings.get('max_new_tokens'))} tokens at time scale 1. Capacity measured "
        f"closed loop with {_fmt(2 * (settings.get('slots') or 0))} clients over "
        f"{_fmt(settings.get('calibrate_s'), 1)} s: **{_fmt(s.get('capacity_rps'), 1)} "
        f"completions/s** (the emulator's cost model predicts "
        f"{_fmt(s.get('modelled_capacity_rps'), 1)}/s for idle ranks). Then "
        f"{_fmt(settings.get('factor'), 0)}x offered: {_fmt(s.get('offered_rps'), 0)} "
        f"requests/s (achieved {_fmt(s.get('achieved_send_rps'), 0)}/s, send lag p99 "
        f"{_fmt(s.get('send_lag_ms_p99'), 1)} ms) for {_fmt(settings.get('seconds'), 0)} s "
        f"with {_fmt(settings.get('deadline_s'), 1)} s deadlines: "
        f"{_fmt(s.get('overload_calls'))} calls, {_outcomes(s.get('overload_outcomes'))}; "
        f"**{_fmt(s.get('completions_rps'), 1)} completions/s (OK calls ending in a window "
        "of the offered length that starts one service time after the first arrival) = "
        f"{_fmt(s.get('completions_vs_capacity'), 2)} of capacity** (target >= 0.90); OK "
        f"latency p50 / p99 {_fmt(ok.get('p50'), 0)} / {_fmt(ok.get('p99'), 0)} ms.",
        "",
    ]


def _restart(s: dict[str, Any]) -> list[str]:
    settings = s.get("settings") or {}
    events = s.get("events") or {}
    phases = s.get("by_phase") or {}
    return [
        "### Backend restart",
        "",
        f"{_fmt(settings.get('rate'), 0)} unary calls/s of "
        f"{_fmt(settings.get('max_new_tokens'))} tokens, deadline "
        f"{_fmt(settings.get('deadline_s'), 0)} s, until "
        f"{_fmt(settings.get('after_restart_s'), 1)} s after the new emulator listens; the "
        "emulator killed at "
        f"{_fmt(events.get('kill_s'), 1)} s, a new one started on the same port "
        f"{_fmt(settings.get('down_s'), 1)} s later, listening at "
        f"{_fmt(events.get('ready_s'), 1)} s (backend down **{_fmt(s.get('outage_s'), 1)} s**, "
        "its own start-up included). Outcomes by when the call was sent: before the kill "
        f"{_outcomes(phases.get('before_kill'))}; backend down "
        f"{_outcomes(phases.get('backend_down'))}; after the restart "
        f"{_outcomes(phases.get('after_restart'))}. Calls with a deadline above 10 s that "
        f"failed: **{_fmt(s.get('long_deadline_failed'))} of "
        f"{_fmt(s.get('long_deadline_calls'))}** (target 0). The kill: the emulator dies at "
        "once (`POST /admin/instance` `die`: every connection reset, the listening socket "
        "closed), answering with what it had finished by then, and its process is then "
        "SIGKILLed; the served count adds that to the new emulator's.",
        "",
    ]


def _cancel_deadline(s: dict[str, Any]) -> list[str]:
    settings = s.get("settings") or {}
    roles = s.get("by_role") or {}
    return [
        "### Cancel and deadline",
        "",
        f"{_fmt(settings.get('calls'))} calls at {_fmt(settings.get('rate'), 0)}/s, "
        f"{_fmt(settings.get('max_new_tokens'))} tokens (about "
        f"{_fmt(settings.get('expected_service_s'), 2)} s each at time scale 1), unary and "
        "streams alike; a third cancelled by the client after 15-70 % of the expected "
        "service time, a third with a client deadline of 15-70 % of it, a third normal. "
        f"Client: normal {_outcomes(roles.get('normal'))}; cancelled "
        f"{_outcomes(roles.get('cancel'))}; short deadline {_outcomes(roles.get('deadline'))}. "
        f"Scheduler: `cancelled` {_fmt(s.get('scheduler_cancelled'))} (client cancels "
        f"{_fmt(s.get('client_cancelled'))}), `client_deadline` "
        f"{_fmt(s.get('scheduler_client_deadline'))} + `refused_deadline` "
        f"{_fmt(s.get('scheduler_refused_deadline'))} + `deadline` "
        f"{_fmt(s.get('scheduler_deadline'))} (client deadlines "
        f"{_fmt(s.get('client_deadline_exceeded'))}).",
        "",
    ]


_DETAILS = {
    "cancel_deadline": _cancel_deadline,
    "stream_length": _streams,
    "overload": _overload,
    "soak": _soak,
    "backend_restart": _restart,
}


def render_dataplane(data: dict[str, Any], source: Path) -> list[str]:
    scenarios = data.get("scenarios") or []
    machine = data.get("machine", {})
    lines = [
        "## Data plane: soak and faults (`dataplane`)",
        "",
        "**Measured on the SGLang emulator on this machine, not on GPUs**: "
        f"{data.get('cluster', '')}; scheduler {data.get('scheduler', '')}; "
        f"{data.get('prompts', '')}; load generator {data.get('load_generator', '')}. "
        "Latencies come from the emulator's cost model at the stated time scale "
        "(docs/emulator.md), and every process shares this machine's cores, so CPU and "
        "latency numbers describe this machine. Every scenario reconciles the client's "
        "final status of each call with the scheduler's counters (GetStats `outcomes` and "
        "Prometheus `moe_scheduler_requests_total`, deltas over the scenario) and the "
        "emulator's served requests.",
        "",
    ]
    if not data.get("quick") and data.get("target_sizes") is False:
        lines += ["**Reduced sizes (see the command below): each section states the sizes "
                  "run; the targets are stated for larger ones.**", ""]  # fmt: skip
    if data.get("quick"):
        lines += ["**Quick mode (smoke test): every scenario shrunk to seconds; the sizes in "
                  "each section are the ones run, not the targets' sizes.**", ""]  # fmt: skip
    lines += [
        f"All targets met: {_verdict(data.get('all_pass'))}.",
        "",
        *_summary(scenarios),
        "",
        "### Reconciliation",
        "",
        "Client status -> scheduler outcomes: OK = ok; INVALID_ARGUMENT = invalid; "
        "RESOURCE_EXHAUSTED = overloaded; DEADLINE_EXCEEDED = refused_deadline "
        "+ deadline + client_deadline; CANCELLED = cancelled; UNAVAILABLE = backend_error; "
        "INTERNAL = internal; UNKNOWN has no outcome (any is a mismatch).",
        "",
        *_reconciliation(scenarios),
        "",
    ]
    for s in scenarios:
        detail = _DETAILS.get(str(s.get("scenario")))
        if detail is not None and s.get("status") == "ok":
            lines += detail(s)
    lines += [
        _machine_line(machine)
        + f" grpcio {machine.get('grpcio', '?')}, aiohttp {machine.get('aiohttp', '?')}."
        + f" Run at {data.get('generated_at', '?')} ({_fmt(data.get('wall_seconds'), 0)} s); "
        + "load average (1/5/15 min) at start: "
        + " / ".join(_fmt(v, 2) for v in data.get("load_average_at_start") or [])
        + ".",
        "",
        f"Reproduce: `{_command(data, 'python -m benchmarks.dataplane')}` then "
        "`python -m benchmarks.render`. Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines
