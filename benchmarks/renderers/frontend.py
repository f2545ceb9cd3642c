"""RESULTS.md section for the ``frontend`` benchmark (the scheduler front-end: gRPC and
the OpenAI listener)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table


def _lat(rec: dict[str, Any], *qs: str) -> str:
    latency = rec.get("latency_ms") or {}
    return " / ".join(_fmt(latency.get(q), 2) for q in qs)


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _cpu(rec: dict[str, Any]) -> str:
    parts = []
    for key, name in (
        ("client", "client"),
        ("emulator", "emulator"),
        ("scheduler", "scheduler"),
        ("sglang_router", "router"),
    ):
        value = rec.get(f"{key}_cpu_us_per_request")
        if value is not None:
            parts.append(f"{name} {value:,.0f}")
    return ", ".join(parts) or "-"


#: What each row sends (its ``api``).
_APIS = {
    "generate": "HTTP `/generate`",
    "grpc": "gRPC `Generate`",
    "openai": "HTTP `/v1/chat/completions`",
}


def _api(rec: dict[str, Any]) -> str:
    """The request kind; rows from before the OpenAI rows carry no ``api``."""
    api = rec.get("api") or ("grpc" if rec.get("path") == "scheduler" else "generate")
    return _APIS.get(api, f"`{api}`")


def _ratio(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _vs_router(rec: dict[str, Any]) -> str:
    vs = rec.get("vs_router") or {}
    if not vs:
        return "-"
    return " / ".join(_ratio(vs.get(k)) for k in ("requests_per_s", "p50", "cpu_per_request"))


def _path(rec: dict[str, Any]) -> str:
    if rec.get("path") == "direct":
        return "emulator directly" + (f" ({rec['run']})" if rec.get("run") else "")
    if rec.get("path") == "sglang_router":
        return "SGLang router (`round_robin`)"
    window = rec.get("window_ms")
    return (
        f"scheduler: `{rec.get('policy')}`, window {_fmt(window, 0)} ms, "
        f"prediction `{rec.get('prediction')}`"
    )


def _notes(records: list[dict[str, Any]]) -> list[str]:
    return [f"- {_path(r)}, {_api(r)}: {r['message']}" for r in records if r.get("message")]


def _load_line(records: list[dict[str, Any]], cpus: Any) -> list[str]:
    """The 1-minute load average each row started under (other work shares the cores)."""
    loads = [r["load_average_before"][0] for r in records if r.get("load_average_before")]
    if not loads:
        return []
    return [
        f"1-minute load average at the start of each row: {min(loads):.2f} to "
        f"{max(loads):.2f} on {_fmt(cpus)} CPUs (each row's is in the JSON)."
    ]


def _openai_summary(throughput: list[dict[str, Any]]) -> list[str]:
    """One line per client count: the OpenAI rows' requests/s and p50, ours / router."""
    lines = []
    for clients in dict.fromkeys(r.get("concurrency") for r in throughput):
        rows = [
            r for r in throughput
            if r.get("concurrency") == clients and r.get("api") == "openai"
            and r.get("status") == "ok"
        ]  # fmt: skip
        if not rows:
            continue
        parts = []
        for r in rows:
            who = {"direct": "emulator directly", "sglang_router": "SGLang router"}.get(
                r["path"], f"scheduler `{r.get('policy')}`/`{r.get('prediction')}`"
            )
            part = (
                f"{who} {_fmt(r.get('requests_per_s'), 0)} requests/s (p50 "
                f"{_fmt(r['latency_ms'].get('p50'), 1)} ms)"
            )
            if r.get("vs_router"):
                part += f", {_ratio(r['vs_router'].get('requests_per_s'))} the router's"
            parts.append(part)
        lines.append(f"- {_fmt(clients)} clients: " + "; ".join(parts) + ".")
    return lines


def render_frontend(data: dict[str, Any], source: Path) -> list[str]:
    settings = data.get("settings", {})
    targets = data.get("targets", {})
    lines = [
        "## Scheduler front-end (`frontend`)",
        "",
        f"{data.get('cluster', '')}; {data.get('prompts', '')}; predictor bundle: "
        f"{data.get('bundle', '-')}; our policy: `{data.get('our_policy', '-')}`. The "
        "emulator, the scheduler and SGLang's router are separate processes; the load "
        f"generator is the benchmark process ({data.get('load_generator', '')}). Emulated, "
        "not measured on GPUs: routed experts are drawn from real per-class profiles and "
        "latency comes from the emulator's cost model (docs/emulator.md).",
        "",
    ]
    if data.get("quick"):
        lines += ["**Quick mode (smoke test): too short to read anything into.**", ""]

    latency = data.get("latency") or []
    routed_rate = settings.get("routed_rate") or next(
        (r.get("offered_rate") for r in latency if r.get("return_routed_experts")), None
    )
    if latency:
        lines += [
            "### Added latency (open loop)",
            "",
            f"{_fmt(settings.get('rate'), 0)} requests/s offered ({settings.get('arrivals')} "
            f"arrivals), {_fmt(settings.get('seconds'), 0)} s measured after "
            f"{_fmt(settings.get('warmup_s'), 1)} s warm-up per row, non-streaming, "
            f"{_fmt(settings.get('max_new_tokens'))} completion tokens; rows with routed "
            f"experts (the feedback path) at {_fmt(routed_rate, 0)} "
            "requests/s (no target verdict): with routed experts drawn, encoded and decoded "
            "on every request, client, emulator and scheduler together need about 4 ms of "
            "CPU per request (CPU column), so 500 requests/s would need both cores for "
            "these processes alone. Direct: "
            "HTTP `POST "
            "/generate` with `routed_dp_rank` over one keep-alive aiohttp session; scheduler: "
            "gRPC unary `Generate`. The OpenAI rows send unary `POST /v1/chat/completions` "
            "(one user message, the prompt; `max_tokens` as above) the same way: to the "
            "emulator's own endpoint (with `routed_dp_rank`) and to the scheduler's "
            "`openai_listen` listener (which forwards it to the emulator's endpoint with the "
            "rank its policy chose). Added = scheduler percentile minus the mean of the direct "
            "runs with the same `return_routed_experts` and the same API (gRPC against "
            "`/generate`, OpenAI against OpenAI), measured before and after the "
            "scheduler rows on the same emulator process (their spread is shown). Target: "
            f"added p50 <= {_fmt(targets.get('added_p50_ms'), 1)} ms and p99 <= "
            f"{_fmt(targets.get('added_p99_ms'), 1)} ms at {_fmt(targets.get('rate'), 0)} "
            "requests/s.",
            "",
        ]
        rows = []
        for r in latency:
            added = r.get("added_ms") or {}
            rows.append(
                [
                    _fmt(r.get("time_scale"), 0),
                    _path(r),
                    _api(r),
                    _fmt(r.get("return_routed_experts")),
                    str(r.get("status")),
                    _fmt(r.get("requests")),
                    f"{_fmt(r.get('achieved_send_rate'), 0)} / "
                    f"{_fmt(r.get('achieved_completion_rate'), 0)}",
                    _lat(r, "p50", "p90", "p99"),
                    f"{_signed(added.get('p50'))} / {_signed(added.get('p99'))}" if added else "-",
                    _fmt(r.get("meets_target")),
                    _fmt((r.get("send_lag_ms") or {}).get("p99"), 2),
                    _cpu(r),
                ]
            )
        lines += _table(
            [
                "time scale",
                "path",
                "request",
                "routed experts",
                "status",
                "requests",
                "sent / completed per s",
                "latency ms p50 / p90 / p99",
                "added ms p50 / p99",
                "meets target",
                "send lag p99 ms",
                "CPU us/request",
            ],
            rows,
        )
        spreads = [
            (r.get("added_ms") or {}).get("direct_p99_spread") for r in latency if r.get("added_ms")
        ]
        lines += [
            "",
            "Send lag: how late the load generator sent a request against its schedule "
            "(it shares the cores). CPU per request of each process over the measured "
            "seconds; at the offered rate the sum of client, emulator and scheduler CPU "
            "per request times the rate must stay below the machine's cores, or queues "
            "grow and the added latency measures the CPU shortage rather than the path."
            + (
                f" Spread of the direct p99 between its two runs: up to "
                f"{max(s for s in spreads if s is not None):.2f} ms."
                if any(s is not None for s in spreads)
                else ""
            ),
            *_notes(latency),
            "",
        ]

    throughput = data.get("throughput") or []
    if throughput or data.get("router_note"):
        lines += [
            "### Sustained throughput (closed loop)",
            "",
            f"Each client sends its next request when the previous answer is in; "
            f"{_fmt(settings.get('throughput_seconds'), 0)} s per row after a warm-up, time "
            f"scale 0, {_fmt(settings.get('max_new_tokens'))} completion tokens, no routed "
            "experts requested on any path (pure forwarding cost). SGLang's router gets no "
            "`routed_dp_rank` (the emulator spreads its requests round robin). Two request "
            "kinds, the same prompts and clients: SGLang's native API (`/generate` directly "
            "and through the router, gRPC `Generate` through the scheduler) and the OpenAI "
            "one (unary `POST /v1/chat/completions` on all three: the emulator's endpoint, "
            "the scheduler's `openai_listen` listener, the router's endpoint). Ours / router: "
            "a scheduler row's requests/s, p50 and CPU per request (the scheduler's against "
            "the router's) over the router's row with the same clients and API family (gRPC "
            "against the router's `/generate`).",
            "",
        ]
        rows = [
            [
                _fmt(r.get("concurrency")),
                _path(r),
                _api(r),
                str(r.get("status")),
                _fmt(r.get("requests")),
                _fmt(r.get("requests_per_s"), 0),
                _lat(r, "p50", "p99"),
                _cpu(r),
                _vs_router(r),
            ]
            for r in throughput
        ]
        lines += _table(
            ["clients", "path", "request", "status", "requests", "requests/s",
             "latency ms p50 / p99", "CPU us/request",
             "ours / router: requests/s / p50 / CPU"],
            rows,
        )  # fmt: skip
        summary = _openai_summary(throughput)
        if summary:
            lines += ["", "The OpenAI path (`/v1/chat/completions`), same run:", "", *summary]
        lines += ["", *_load_line(throughput, data.get("machine", {}).get("cpu_count"))]
        lines += ["", f"SGLang router: {data.get('router_note') or '-'}"]
        if data.get("router_openai_note"):
            lines += ["", f"SGLang router, OpenAI endpoint: {data['router_openai_note']}"]
        lines += [*_notes(throughput), ""]

    prediction = data.get("prediction") or []
    if prediction:
        lines += [
            "### Prediction modes: cost and gain",
            "",
            f"The same {_fmt(settings.get('replay_prompts'))} real prompts replayed through "
            f"`scheduler.server.cli.replay` at {_fmt(settings.get('replay_rate'), 0)} "
            f"requests/s, {_fmt(settings.get('replay_new_tokens'))} completion tokens, "
            f"emulator time scale {_fmt(settings.get('replay_time_scale'), 0)} (modelled "
            "prefill and decode times), `probe_min_new_tokens` 0 (every request probed). "
            "Inter-node bytes per token and local fraction are measured from the routed "
            "experts the emulator returns for each request; backend requests per request "
            "counts the probes (from the emulator's finished-request counters). Conversation "
            "mode is not measured: the prompt corpus has no multi-turn conversations.",
            "",
        ]
        rows = []
        for r in prediction:
            bpt = r.get("inter_node_bytes_per_token")
            change = r.get("inter_node_bytes_vs_first_none")
            rows.append(
                [
                    f"`{r.get('policy')}`",
                    _fmt(r.get("window_ms"), 0),
                    f"`{r.get('prediction')}`",
                    str(r.get("status")),
                    _fmt(r.get("throughput_rps"), 1),
                    _lat(r, "p50", "p99"),
                    _fmt(r.get("backend_requests_per_request"), 2),
                    "-" if bpt is None else f"{bpt / 1e3:,.1f}",
                    "-" if change is None else f"{100 * change:+.1f}%",
                    _fmt(r.get("local_fraction_mean"), 3),
                    "-"
                    if r.get("prediction") == "none" or r.get("prediction_checks") == 0
                    else _fmt(r.get("prediction_hit_rate"), 3),
                    _fmt(r.get("rank_requests_max_over_mean"), 2),
                    _cpu(r),
                ]
            )
        lines += _table(
            [
                "policy",
                "window ms",
                "prediction",
                "status",
                "requests/s",
                "latency ms p50 / p99",
                "backend requests per request",
                "inter-node KB per token",
                "inter-node bytes vs first row",
                "local fraction",
                "prediction hit rate",
                "max/mean requests per rank",
                "CPU us/request",
            ],
            rows,
        )
        lines += [*_notes(prediction), ""]

    rss = [
        r.get("scheduler_peak_rss_mib")
        for part in ("latency", "throughput", "prediction")
        for r in data.get(part) or []
        if r.get("scheduler_peak_rss_mib") is not None
    ]
    if rss:
        lines += [
            f"Scheduler peak resident memory over the runs: {min(rss):,.0f} to "
            f"{max(rss):,.0f} MiB (one fresh process per row).",
            "",
        ]

    lines += [
        _machine_line(data.get("machine", {}))
        + f" grpcio {data.get('machine', {}).get('grpcio', '?')}, aiohttp "
        + f"{data.get('machine', {}).get('aiohttp', '?')}, sglang-router "
        + f"{data.get('machine', {}).get('sglang_router', 'not installed')}."
        + f" Run at {data.get('generated_at', '?')} ({_fmt(data.get('wall_seconds'), 0)} s); "
        + "load average (1/5/15 min) at start: "
        + " / ".join(_fmt(v, 2) for v in data.get("load_average_at_start") or [])
        + " (other work competes for the same cores; each row records its own).",
        "",
        f"Reproduce: `{_command(data, 'python -m benchmarks.frontend')}` then "
        "`python -m benchmarks.render`. Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines
