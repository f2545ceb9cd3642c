"""Benchmark: the scheduler front-end (gRPC and its OpenAI listener) against the
emulator, directly and behind SGLang's own router.

Every server is its own process on 127.0.0.1 (ports read back from their startup lines):
``moe-scheduler emulate`` (4 nodes x 2 GPUs of DeepSeek-V2-Lite with a placement solved by
``moe-scheduler place`` from the ESFT per-label profile), ``moe-scheduler serve`` and,
where ``sglang-router`` is installed, ``python -m sglang_router.launch_router``. This
process is the load generator, so all of them share the machine's cores as they would in
reality; each run records every process's CPU time per request.

Three parts, every comparison on the same emulator process in the same run:

1. ``latency``: open loop at ``--rate`` requests/s (evenly spaced arrivals by default,
   or Poisson with a fixed seed), non-streaming, ``--max-new-tokens`` 4, real prompts:
   end-to-end latency of HTTP ``POST /generate`` straight to the emulator (one aiohttp
   session, keep-alive, ``routed_dp_rank`` round robin) vs gRPC unary ``Generate``
   through the scheduler (``scheduler.client.SchedulerClient``), under several policies,
   scheduling windows and prediction modes. Added latency = scheduler percentile minus
   the direct percentile (the mean of the direct runs measured before and after).
   Targets: added p50 <= 0.5 ms, p99 <= 2 ms at 500 requests/s. The emulator answers at
   once (``--time-scale 0``); one pair of runs repeats it at time scale 1. One more group
   takes the OpenAI path: unary ``POST /v1/chat/completions`` (``OpenAITarget``) to the
   emulator's own endpoint vs the scheduler's ``[server] openai_listen`` listener.
2. ``throughput``: closed loop, N clients each sending its next request when the previous
   answer is in, through the emulator directly, the scheduler, and SGLang's router
   (round robin) in front of the same emulator, each with SGLang's native API
   (``/generate``; gRPC ``Generate`` through the scheduler) and with the OpenAI one
   (``/v1/chat/completions`` on all three); each scheduler row gets its ratio to the
   router's row of the same family (``vs_router``).
3. ``prediction``: the same real prompts replayed (``scheduler.server.cli.replay``) with
   prediction none / text / probe under ``locality_window`` and ``locality_band`` at
   time scale 1: latency, throughput, and the inter-node bytes per token and local
   fraction measured from the routed experts the emulator returns (drawn from real
   per-class profiles, not measured on GPUs).

Usage::

    python -m benchmarks.frontend [--data ../shared/data] [--quick]
        [--out benchmarks/results/frontend.json] [--work benchmarks/work/frontend]

Setup (profile, placement, predictor bundle from ``moe-scheduler fit``) is cached under
``--work``. ``--quick`` runs a few seconds per part with a small bundle (for the smoke
test). Failures are recorded in the JSON (status "error" and a message), not raised.
The setup cache, the server processes and the load generators are in ``benchmarks.harness``;
this module is the experiment: its runs, parts and result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.harness import (
    GPUS_PER_NODE,
    MAX_PROMPT_CHARS,
    MODEL,
    NODES,
    OUR_POLICY,
    GrpcTarget,
    HttpTarget,
    OpenAITarget,
    Proc,
    Target,
)
from benchmarks.machine import machine_facts

TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 2.0
TARGET_RATE = 500.0


# --------------------------------------------------------------------------- runs


def _cpu_fields(servers: dict[str, Proc], before: dict[str, float | None], n: int
                ) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for name, proc in servers.items():
        after = harness.cpu_seconds(proc.pid)
        b = before.get(name)
        if after is not None and b is not None and n:
            out[f"{name}_cpu_us_per_request"] = round(1e6 * (after - b) / n, 1)
    return out


def measure(
    kind: str, make_target: Callable[[], Target], servers: dict[str, Proc], *,
    rate: float = 0.0, seconds: float, warmup_s: float, arrivals: str = "even",
    seed: int = 0, concurrency: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One run (open loop at ``rate`` or closed loop with ``concurrency`` clients) after a
    warm-up; a record with latency percentiles, achieved rate and CPU per request."""
    target = make_target()  # connects in __aenter__, inside the run's event loop

    async def go() -> tuple[dict[str, Any], dict[str, float | None]]:
        async with target:
            if kind == "open":
                await harness.open_loop(
                    target, harness.arrival_offsets(rate, warmup_s, "even", seed), 10**6
                )
                before = {name: harness.cpu_seconds(p.pid) for name, p in servers.items()}
                offsets = harness.arrival_offsets(rate, seconds, arrivals, seed)
                return await harness.open_loop(target, offsets), before
            await harness.closed_loop(target, concurrency, warmup_s)
            before = {name: harness.cpu_seconds(p.pid) for name, p in servers.items()}
            return await harness.closed_loop(target, concurrency, seconds), before

    load = harness.loadavg()
    result, before = asyncio.run(go())
    n = len(result["latencies"])
    record: dict[str, Any] = {
        "api": target.api,
        "status": "ok" if not result["errors"] and n else "error",
        "requests": n,
        "errors": len(result["errors"]),
        "seconds": round(result["seconds"], 3),
        "latency_ms": harness.percentiles_ms(result["latencies"]),
        "client_cpu_us_per_request": round(1e6 * result["client_cpu_s"] / max(n, 1), 1),
        "load_average_before": load,
    }
    if kind == "open":
        sent = n + len(result["errors"])
        record.update(
            offered_rate=rate,
            achieved_send_rate=round(sent / max(result["send_seconds"], 1e-9), 1),
            achieved_completion_rate=round(n / max(result["seconds"], 1e-9), 1),
            send_lag_ms={
                "p50": harness.ms(float(np.percentile(result["lags"], 50))),
                "p99": harness.ms(float(np.percentile(result["lags"], 99))),
            },
        )
    else:
        record.update(
            concurrency=concurrency, requests_per_s=round(n / max(result["seconds"], 1e-9), 1)
        )
    record |= _cpu_fields(servers, before, n)
    if result["errors"]:
        record["message"] = f"{len(result['errors'])} failed, e.g. {result['errors'][0]}"
    lat = record["latency_ms"]
    harness.eprint(
        f"    {n} ok, {len(result['errors'])} failed, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"{record.get('achieved_completion_rate', record.get('requests_per_s'))} requests/s, "
        f"load {load}"
    )
    return record


# --------------------------------------------------------------------------- parts


@dataclass
class Ctx:
    data: Path
    setup: dict[str, Any]
    prompts: list[str]
    args: argparse.Namespace
    log_dir: Path
    our_policy: str


def _with_scheduler(
    ctx: Ctx, emulator: Proc, name: str, policy: str, window_ms: float, mode: str,
    run: Callable[[Proc], dict[str, Any]], **config: Any,
) -> dict[str, Any]:  # fmt: skip
    record: dict[str, Any] = {"policy": policy, "window_ms": window_ms, "prediction": mode}
    record |= {k: v for k, v in config.items()}
    scheduler = None
    try:
        path = harness.write_config(
            ctx.log_dir / f"{name}.toml", emulator.address, ctx.setup, policy, window_ms, mode,
            **config,
        )  # fmt: skip
        scheduler = harness.start_scheduler(path, ctx.log_dir)
        record |= run(scheduler)
    except Exception as e:  # recorded as data
        traceback.print_exc()
        record.update(status="error", message=f"{type(e).__name__}: {e}")
    finally:
        if scheduler is not None:
            record["scheduler_peak_rss_mib"] = harness.peak_rss_mib(scheduler.pid)
            record["scheduler_exit_code"] = scheduler.stop()
    return record


def part_latency(ctx: Ctx, emulator: Proc, time_scale: float) -> list[dict[str, Any]]:
    """Groups of scheduler runs, each bracketed by direct runs (same flags and rate)
    before and after it on the same emulator."""
    a, prompts, mnt = ctx.args, ctx.prompts, ctx.args.max_new_tokens
    ours = ctx.our_policy
    # (name, policy, window ms, prediction mode); no routed experts: the request path
    request_path = [
        ("fast_path", "total_requests", 0.0, "none"),
        ("fast_path_text", "total_requests", 0.0, "text"),
        ("ours_w0_text", ours, 0.0, "text"),
        ("ours_w2_text", ours, 2.0, "text"),
        ("ours_w0_none", ours, 0.0, "none"),
    ]
    # with return_routed_experts (the feedback path) at a rate these 2 cores sustain
    routed = [("fast_path_routed", "total_requests", 0.0, "none"),
              ("ours_w2_text_routed", ours, 2.0, "text")]  # fmt: skip
    # the OpenAI path: /v1/chat/completions directly vs through the scheduler's listener
    openai = [("openai_fast_path", "total_requests", 0.0, "none")]
    openai += [] if a.quick else [("openai_ours_w2_text", ours, 2.0, "text")]
    # (api, routed experts, rate, scheduler rows); api "generate": gRPC through ours
    groups: list[tuple[str, bool, float, list[tuple[str, str, float, str]]]]
    if time_scale != 0:
        groups = [("generate", False, a.rate, request_path[:1])]
    elif a.quick:
        groups = [("generate", False, a.rate, [request_path[0], request_path[3]])]
    else:
        groups = [("generate", False, a.rate, request_path),
                  ("generate", True, a.routed_rate, routed)]  # fmt: skip
    if time_scale == 0:
        groups.append(("openai", False, a.rate, openai))
    records: list[dict[str, Any]] = []

    def common(rate: float) -> dict[str, Any]:
        return {"rate": rate, "seconds": a.seconds, "warmup_s": a.warmup,
                "arrivals": a.arrivals, "seed": a.seed}  # fmt: skip

    def direct(api: str, with_experts: bool, rate: float, when: str) -> None:
        label = "direct_routed" if with_experts else "direct"
        label += "_openai" if api == "openai" else ""
        harness.eprint(f"  latency ts={time_scale:g}: {label} ({when}, {rate:g}/s)")
        rec: dict[str, Any] = {
            "scenario": label, "path": "direct", "run": when, "api": api,
            "return_routed_experts": with_experts,
        }  # fmt: skip

        def target() -> Target:
            if api == "openai":
                return OpenAITarget(emulator.address, prompts, mnt, rank=True)
            return HttpTarget(emulator.address, prompts, mnt, with_experts, rank=True)

        try:
            rec |= measure(
                "open",
                target,
                {"emulator": emulator},
                **common(rate),
            )
        except Exception as e:
            traceback.print_exc()
            rec.update(status="error", message=f"{type(e).__name__}: {e}")
        records.append(rec | {"time_scale": time_scale})

    def scheduled(
        api: str, with_experts: bool, rate: float, name: str, policy: str, window: float,
        mode: str,
    ) -> None:  # fmt: skip
        harness.eprint(
            f"  latency ts={time_scale:g}: {name} ({policy}, window {window:g} ms, {mode})"
        )

        def target(s: Proc) -> Target:
            if api == "openai":
                return OpenAITarget(s.extra["openai_url"], prompts, mnt, rank=False)
            return GrpcTarget(s.address, prompts, mnt)

        def run(s: Proc) -> dict[str, Any]:
            return measure(
                "open",
                lambda: target(s),
                {"emulator": emulator, "scheduler": s},
                **common(rate),
            )

        rec = _with_scheduler(
            ctx, emulator, f"lat-ts{time_scale:g}-{name}", policy, window, mode, run,
            routed=with_experts,
        )  # fmt: skip
        records.append(
            {"scenario": name, "path": "scheduler", "return_routed_experts": with_experts}
            | {"api": "openai" if api == "openai" else "grpc"}
            | rec
            | {"time_scale": time_scale}
        )

    for api, with_experts, rate, configs in groups:
        direct(api, with_experts, rate, "before")
        for c in configs:
            scheduled(api, with_experts, rate, *c)
        direct(api, with_experts, rate, "after")
    _added(records)
    return records


def _added(records: list[dict[str, Any]]) -> None:
    """Scheduler percentile minus the mean of the direct runs with the same flags (and the
    same family: gRPC against /generate, OpenAI against the emulator's OpenAI endpoint)."""
    for rec in records:
        if rec["path"] != "scheduler" or rec.get("status") != "ok":
            continue
        openai = rec.get("api") == "openai"
        base = [
            r for r in records
            if r["path"] == "direct" and r.get("status") == "ok"
            and (r.get("api") == "openai") == openai
            and r["return_routed_experts"] == rec["return_routed_experts"]
            and r["offered_rate"] == rec["offered_rate"]
        ]  # fmt: skip
        if not base:
            continue
        added = {}
        for q in ("p50", "p99"):
            ref = float(np.mean([r["latency_ms"][q] for r in base]))
            added[q] = round(rec["latency_ms"][q] - ref, 3)
            added[f"direct_{q}_spread"] = round(
                max(r["latency_ms"][q] for r in base) - min(r["latency_ms"][q] for r in base), 3
            )
        rec["added_ms"] = added
        rec["meets_target"] = (
            added["p50"] <= TARGET_ADDED_P50_MS and added["p99"] <= TARGET_ADDED_P99_MS
            if rec["offered_rate"] >= TARGET_RATE
            else None  # the target is stated at TARGET_RATE requests/s
        )


def part_throughput(ctx: Ctx, emulator: Proc) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Closed-loop rows per concurrency, two request kinds on every path: SGLang's native
    API (HTTP /generate directly and through the router, gRPC Generate through the
    scheduler) and the OpenAI one (HTTP /v1/chat/completions on all three). Returns the
    rows and the router's notes (``router``: None when it ran; ``openai``: None when it
    serves /v1/chat/completions, else why not)."""
    a, prompts, mnt = ctx.args, ctx.prompts, ctx.args.max_new_tokens
    common = {"seconds": a.tp_seconds, "warmup_s": min(1.0, a.warmup)}
    records: list[dict[str, Any]] = []
    notes: dict[str, Any] = {"router": harness.router_available(), "openai": None}
    router = None
    if notes["router"] is None:
        try:
            router = harness.start_router(emulator.address, ctx.log_dir)
            notes["openai"] = harness.openai_check(router.address)
        except Exception as e:
            traceback.print_exc()
            notes["router"] = f"sglang-router did not start: {type(e).__name__}: {e}"

    def closed(rec: dict[str, Any], make: Callable[[], Target], servers: dict[str, Proc]
               ) -> dict[str, Any]:  # fmt: skip
        try:
            rec |= measure("closed", make, servers, concurrency=rec["concurrency"], **common)
        except Exception as e:
            rec.update(status="error", message=f"{type(e).__name__}: {e}")
        return rec

    def direct(api: str) -> Target:
        if api == "openai":
            return OpenAITarget(emulator.address, prompts, mnt, rank=True)
        return HttpTarget(emulator.address, prompts, mnt, False, rank=True)

    def scheduled(api: str, s: Proc) -> Target:
        if api == "openai":
            return OpenAITarget(s.extra["openai_url"], prompts, mnt, rank=False)
        return GrpcTarget(s.address, prompts, mnt)

    def routed(api: str, r: Proc) -> Target:
        if api == "openai":
            return OpenAITarget(r.address, prompts, mnt, rank=False)
        return HttpTarget(r.address, prompts, mnt, False, rank=False)

    variants = [("total_requests", 0.0, "none"), (ctx.our_policy, 2.0, "text")]
    try:
        for concurrency in a.concurrency:
            for api in ("generate", "openai"):  # the router's and the emulator's API
                harness.eprint(f"  throughput: {concurrency} clients, {api}")
                label = {"concurrency": concurrency, "time_scale": 0.0, "api": api}
                rec = {"path": "direct"} | label
                records.append(closed(rec, partial(direct, api), {"emulator": emulator}))

                def run(s: Proc, c: int = concurrency, api: str = api) -> dict[str, Any]:
                    return measure(
                        "closed",
                        lambda: scheduled(api, s),
                        {"emulator": emulator, "scheduler": s},
                        concurrency=c,
                        **common,
                    )

                for policy, window, mode in variants[: 1 if a.quick else 2]:
                    tag = "openai-" if api == "openai" else ""
                    rec = _with_scheduler(
                        ctx, emulator, f"tp-{concurrency}-{tag}{policy}-{mode}", policy,
                        window, mode, run, routed=False,
                    )  # fmt: skip
                    ours = {"api": "openai" if api == "openai" else "grpc"}
                    records.append({"path": "scheduler"} | label | ours | rec)
                if router is None:
                    continue
                rec = {"path": "sglang_router", "policy": "round_robin"} | label
                if api == "openai" and notes["openai"] is not None:
                    rec.update(status="not_served", message=notes["openai"])
                    records.append(rec)
                    continue
                servers = {"emulator": emulator, "sglang_router": router}
                records.append(closed(rec, partial(routed, api, router), servers))
    finally:
        if router is not None:
            router.stop()
    _vs_router(records)
    return records, notes


def _vs_router(records: list[dict[str, Any]]) -> None:
    """On each scheduler row: ours / the router's row with the same clients and request
    family (gRPC Generate against the router's /generate; OpenAI against OpenAI)."""
    for rec in records:
        if rec["path"] != "scheduler" or rec.get("status") != "ok":
            continue
        openai = rec.get("api") == "openai"
        router = next(
            (
                r for r in records
                if r["path"] == "sglang_router" and r.get("status") == "ok"
                and r["concurrency"] == rec["concurrency"]
                and (r.get("api") == "openai") == openai
            ),
            None,
        )  # fmt: skip
        if router is None:
            continue
        ours_cpu = rec.get("scheduler_cpu_us_per_request")
        their_cpu = router.get("sglang_router_cpu_us_per_request")
        rec["vs_router"] = {
            "requests_per_s": round(rec["requests_per_s"] / router["requests_per_s"], 3),
            "p50": round(rec["latency_ms"]["p50"] / router["latency_ms"]["p50"], 3),
            "p99": round(rec["latency_ms"]["p99"] / router["latency_ms"]["p99"], 3),
            "cpu_per_request": round(ours_cpu / their_cpu, 3)
            if ours_cpu is not None and their_cpu
            else None,
        }


def _backend_finished(emulator: Proc) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{emulator.address}/v1/loads", timeout=10) as r:
        loads = json.loads(r.read())
    entries = loads if isinstance(loads, list) else loads.get("loads", loads.get("data", []))
    return int(sum(e["emulator"]["finished_reqs"] for e in entries))


def part_prediction(ctx: Ctx, emulator: Proc) -> list[dict[str, Any]]:
    from scheduler.replay import replay

    a = ctx.args
    rows = [{"id": str(i), "prompt": p} for i, p in enumerate(ctx.prompts[: a.replay_prompts])]
    runs: list[tuple[str, str]] = [("total_requests", "none")]
    for policy in (OUR_POLICY, "locality_band"):
        runs += [(policy, mode) for mode in ("none", "text", "probe")]
    if a.quick:
        runs = [(ctx.our_policy, "none"), (ctx.our_policy, "probe")]
    records: list[dict[str, Any]] = []
    for policy, mode in runs:
        harness.eprint(f"  prediction: {policy}, {mode}")
        window = 2.0 if policy == "locality_window" else 0.0

        def run(s: Proc) -> dict[str, Any]:
            before = {
                "emulator": harness.cpu_seconds(emulator.pid),
                "scheduler": harness.cpu_seconds(s.pid),
            }
            finished0 = _backend_finished(emulator)
            result = asyncio.run(
                replay(
                    s.address, rows, rate=a.replay_rate, max_new_tokens=a.replay_new_tokens,
                    timeout=60, progress=False,
                )
            )  # fmt: skip
            backend_requests = _backend_finished(emulator) - finished0
            records_ = result.pop("records")
            stats = result.pop("server_stats")
            ok = result["statuses"].get("OK", 0)
            out: dict[str, Any] = {
                "status": "ok" if ok == len(records_) else "error",
                "requests": len(records_),
                "statuses": result["statuses"],
                "throughput_rps": round(result["throughput_rps"], 1),
                "latency_ms": {
                    "p50": harness.ms(result["latency_p50_s"]),
                    "p99": harness.ms(result["latency_p99_s"]),
                },
                "queue_ms_mean": harness.ms(
                    float(np.mean([r["queue_s"] for r in records_ if r["status"] == "OK"]))
                ),
                "inter_node_bytes_per_token": result["inter_node_bytes_per_token"],
                "local_fraction_mean": result["local_fraction_mean"],
                "rank_requests_max_over_mean": result["rank_requests_max_over_mean"],
                "prediction_hit_rate": stats.get("prediction_hit_rate"),
                "prediction_checks": int(stats.get("prediction_checks", 0)),
                "backend_requests_per_request": round(backend_requests / max(ok, 1), 3),
            }
            out |= _cpu_fields({"emulator": emulator, "scheduler": s}, before, ok)
            if out["status"] != "ok":
                bad = next(r for r in records_ if r["status"] != "OK")
                out["message"] = f"{bad['status']}: {bad.get('error', '')}"
            return out

        rec = _with_scheduler(
            ctx, emulator, f"pred-{policy}-{mode}", policy, window, mode, run,
            probe_min_new_tokens=0,
        )  # fmt: skip
        records.append(rec | {"time_scale": a.replay_time_scale})
    base = next((r for r in records if r.get("status") == "ok" and r["prediction"] == "none"), None)
    for rec in records:
        if base is None or rec.get("status") != "ok" or not base.get("inter_node_bytes_per_token"):
            continue
        rec["inter_node_bytes_vs_first_none"] = round(
            rec["inter_node_bytes_per_token"] / base["inter_node_bytes_per_token"] - 1, 4
        )
    return records


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--quick`` shrinks every part to a few seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="real data (../shared/data)")
    parser.add_argument("--out", type=Path, default=harness.BENCH_DIR / "results" / "frontend.json")
    parser.add_argument("--work", type=Path, default=harness.BENCH_DIR / "work" / "frontend",
                        help="cached setup and server logs")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few seconds per part")
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop requests/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured s per latency run")
    parser.add_argument("--routed-rate", type=float, default=200.0,
                        help="open-loop rate of the runs with return_routed_experts")  # fmt: skip
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up s before each run")
    parser.add_argument("--arrivals", choices=["even", "poisson"], default="even")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--tp-seconds", type=float, default=5.0, help="s per throughput run")
    parser.add_argument("--replay-prompts", type=int, default=300)
    parser.add_argument("--replay-rate", type=float, default=60.0)
    parser.add_argument("--replay-new-tokens", type=int, default=32)
    parser.add_argument("--replay-time-scale", type=float, default=1.0)
    parser.add_argument("--no-time-scale-1", action="store_true",
                        help="skip the latency pair at time scale 1")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", action="append",
                        choices=["latency", "throughput", "prediction"])  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.rate, args.seconds, args.warmup = 200.0, 1.0, 0.3
        args.concurrency, args.tp_seconds = [8], 1.0
        args.replay_prompts, args.replay_rate = 24, 40.0
        args.replay_time_scale = 0.0  # reuses the first emulator
        args.no_time_scale_1 = True
    return args


def describe_run(
    args: argparse.Namespace, argv: list[str] | None, setup: dict[str, Any], prompts: list[str],
    load_at_start: list[float] | None,
) -> dict[str, Any]:  # fmt: skip
    """The result's header: command, cluster, prompts, targets, settings and machine."""
    return {
        "benchmark": "frontend",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.frontend", *(sys.argv[1:] if argv is None else argv)]
        ),
        "quick": args.quick,
        "cluster": f"emulator {NODES} nodes x {GPUS_PER_NODE} GPUs, {MODEL}, placement "
        "`moe-scheduler place --method ours` from the ESFT per-label profile",
        "prompts": f"{len(prompts)} real corpus prompts (<= {MAX_PROMPT_CHARS} characters, "
        f"seeded sample over the four domains, seed {args.seed})",
        "bundle": setup["bundle_from"],
        "our_policy": OUR_POLICY,
        "targets": {
            "added_p50_ms": TARGET_ADDED_P50_MS,
            "added_p99_ms": TARGET_ADDED_P99_MS,
            "rate": 500.0,
        },  # fmt: skip
        "settings": {
            "rate": args.rate,
            "routed_rate": args.routed_rate,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "arrivals": args.arrivals,
            "max_new_tokens": args.max_new_tokens,
            "concurrency": args.concurrency,
            "throughput_seconds": args.tp_seconds,
            "replay_prompts": args.replay_prompts,
            "replay_rate": args.replay_rate,
            "replay_new_tokens": args.replay_new_tokens,
            "replay_time_scale": args.replay_time_scale,
        },  # fmt: skip
        "load_generator": "this process (asyncio): aiohttp keep-alive session for HTTP, one "
        "grpc.aio channel (scheduler.client.SchedulerClient) for the scheduler; the servers "
        "are separate processes sharing the same cores",
        "machine": machine_facts("numpy", "aiohttp", "grpcio", "sglang-router"),
        "load_average_at_start": load_at_start,
    }


def run_parts(ctx: Ctx, parts: list[str], result: dict[str, Any]) -> None:
    """The parts asked for, into ``result``; one emulator process per time scale, started
    when first needed and reused, all stopped at the end."""
    args = ctx.args
    emulators: dict[float, Proc] = {}

    def emulator(time_scale: float) -> Proc:
        if time_scale not in emulators:
            emulators[time_scale] = harness.start_emulator(
                time_scale, ctx.setup["placement"], ctx.data, ctx.log_dir
            )
        return emulators[time_scale]

    try:
        if "latency" in parts:
            harness.eprint("frontend benchmark: latency (time scale 0)")
            result["latency"] = part_latency(ctx, emulator(0.0), 0.0)
        if "throughput" in parts:
            harness.eprint("frontend benchmark: throughput (time scale 0)")
            result["throughput"], notes = part_throughput(ctx, emulator(0.0))
            result["router_note"], result["router_openai_note"] = notes["router"], notes["openai"]
        if "latency" in parts and not args.no_time_scale_1:
            harness.eprint("frontend benchmark: latency (time scale 1)")
            result["latency"] += part_latency(ctx, emulator(1.0), 1.0)
        if "prediction" in parts:
            harness.eprint("frontend benchmark: prediction modes")
            result["prediction"] = part_prediction(ctx, emulator(args.replay_time_scale))
    finally:
        for proc in emulators.values():
            proc.stop()


def add_router_notes(result: dict[str, Any]) -> None:
    """What the router rows stand for, where the router ran (and served OpenAI)."""
    if "router_note" in result and result["router_note"] is None:
        result["router_note"] = (
            "sglang-router started with --policy round_robin in front of the emulator; it "
            "reads the worker's /model_info, and cannot load a tokenizer for the model name "
            "offline (only a warning: /generate with text passes through)"
        )
    if result.get("router_note") and result.get("router_openai_note") is None:
        result["router_openai_note"] = (
            "sglang-router forwards POST /v1/chat/completions to the worker (checked at its "
            "start: GET /v1/models, then one request answered 200 with the tokens asked for)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = (args.data or harness.default_data()).resolve()
    if not (data / "prompts").is_dir() or not (data / "traces").is_dir():
        harness.eprint(f"frontend benchmark: real data not found at {data} (pass --data)")
        return 2
    parts = args.part or ["latency", "throughput", "prediction"]
    started = time.perf_counter()
    load_at_start = harness.loadavg()
    setup = harness.prepare(data, args.work, args.quick)
    log_dir = args.work / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    prompts = harness.load_prompts(data, 2000, args.seed)
    ctx = Ctx(data, setup, prompts, args, log_dir, OUR_POLICY)
    result = describe_run(args, argv, setup, prompts, load_at_start)
    run_parts(ctx, parts, result)
    add_router_notes(result)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    harness.eprint(f"wrote {args.out} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
