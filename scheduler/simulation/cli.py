"""``moe-scheduler simulate``: replay traces under a routing policy and a placement."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def add_commands(sub: Any) -> None:
    from scheduler.policies import POLICIES

    p = sub.add_parser(
        "simulate",
        help="replay traces through a routing policy: traffic, modelled time, latency",
        description="Replay requests with their real routed experts: arrivals (Poisson at "
        "--rate, else the traces' timestamps, else all at once), a routing policy assigning "
        "DP ranks under --capacity with a FIFO queue, one prefill step then one step per "
        "decode token, each step accounted (SGLang static dispatch) and timed with the "
        "cost model (docs/cost-model.md), each MoE layer padded to its busiest rank. ORACLE "
        "MODE: a request's class for class_affinity is its trace label (an oracle "
        "classifier); locality_band and locality_window see its own prefill expert "
        "histogram (an oracle predictor); benchmarks/policy_grid.py runs held-out "
        "predictors instead. With --window-ms > 0 queued requests are decided jointly once "
        "the oldest has waited that long or --max-window are queued, as the server does "
        "(docs/policies.md). Traces with one phase only (ESFT) are split: "
        "first half prefill, second half decode steps (a proxy).",
    )
    p.add_argument("--traces", type=Path, required=True, help="trace store or importable input")
    p.add_argument("--placement", type=Path, required=True, help="placement directory (place)")
    p.add_argument("--topology", type=Path, required=True, help="topology TOML (docs/placement.md)")
    p.add_argument(
        "--policy",
        required=True,
        choices=list(POLICIES),
        help="; ".join(f"{k}: {v[1]}" for k, v in POLICIES.items()),
    )
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (default: trace)")
    p.add_argument(
        "--capacity", type=int, default=8, help="max running requests per rank (default 8)"
    )
    p.add_argument("--band", type=float, default=0.1, help="locality_band margin (default 0.1)")
    p.add_argument(
        "--balance",
        type=float,
        default=0.5,
        help="locality_window: weight in [0, 1] of the busiest rank's predicted inter-node "
        "pairs against the mean's (1: busiest rank only, 0: mean locality only; default "
        "0.5; docs/policies.md)",
    )
    p.add_argument(
        "--window-ms",
        type=float,
        default=0.0,
        help="scheduling window in modelled ms: queued requests are decided together once "
        "the oldest has waited this long (default 0: each request alone, FIFO)",
    )
    p.add_argument(
        "--max-window",
        type=int,
        default=256,
        help="most requests decided together; a full window is decided at once (default "
        "256, the server's policy.max_window)",
    )
    p.add_argument("--seed", type=int, default=0, help="arrival order and gaps (default 0)")
    prod = p.add_argument_group(
        "production-size replay",
        "keep every DP rank at a production operating point by drawing held-out requests "
        "with replacement (each keeps its own real routing); every figure is then "
        "labelled RESAMPLED (docs/cost-model.md, 'Where it is used')",
    )
    prod.add_argument(
        "--running-per-rank",
        type=int,
        metavar="N",
        help="decode: keep N running requests on every rank (needs --resample)",
    )
    prod.add_argument(
        "--prefill-tokens-per-rank",
        type=int,
        metavar="T",
        help="prefill: chunks of T prompt tokens per rank and step (needs --resample)",
    )
    prod.add_argument(
        "--resample",
        action="store_true",
        help="accept drawing requests with replacement (required by the two options above)",
    )
    prod.add_argument(
        "--phase",
        choices=["decode", "prefill", "both"],
        help="which steps the summary describes (default: decode with --running-per-rank, "
        "prefill with --prefill-tokens-per-rank, both when both are given)",
    )
    prod.add_argument("--steps", type=int, default=64, help="measured steps per phase (default 64)")
    prod.add_argument(
        "--predictions",
        default="oracle",
        metavar="oracle|BUNDLE.npz",
        help="what the policies see: oracle (own label and prefill histogram, default) or "
        "the decode histograms a `moe-scheduler fit` bundle predicts from each request's "
        "prefill routing",
    )
    prod.add_argument(
        "--bound",
        action="store_true",
        help="also compute the lower bound of the MoE-layer time any scheduler could "
        "reach on these steps and this placement",
    )
    prod.add_argument(
        "--split-phase",
        action="store_true",
        help="decode from one-phase traces: replay the second half of each sequence as "
        "decode steps (a proxy, said in the output)",
    )
    p.add_argument("--max-requests", type=int, help="replay only the first N requests")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary as JSON")
    p.set_defaults(handler=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from scheduler.errors import ConfigError, InputError
    from scheduler.jsonio import write_json_atomic
    from scheduler.placement.plan import check_placement_dir
    from scheduler.placement.topology import load_topology
    from scheduler.policies import make_policy
    from scheduler.simulation import SimulationConfig, load_workload, simulate
    from scheduler.traces.importers import open_traces

    topology = load_topology(args.topology)
    if args.max_requests is not None and args.max_requests < 1:
        raise ConfigError(f"--max-requests must be >= 1, got {args.max_requests}")
    try:
        config = SimulationConfig(
            capacity=args.capacity,
            rate=args.rate,
            seed=args.seed,
            window_ms=args.window_ms,
            max_window=args.max_window,
        )
    except ValueError as e:
        raise ConfigError(f"--{e}") from e
    steady = args.running_per_rank is not None or args.prefill_tokens_per_rank is not None
    if steady and not args.resample:
        raise ConfigError(
            "--running-per-rank / --prefill-tokens-per-rank draw held-out requests with "
            "replacement to keep every rank at that load; add --resample to accept "
            "resampled (not measured) figures"
        )
    if not steady and (args.phase is not None or args.predictions != "oracle" or args.bound):
        raise ConfigError(
            "--phase, --predictions and --bound belong to the production-size replay: "
            "give --running-per-rank and/or --prefill-tokens-per-rank with --resample"
        )
    with tempfile.TemporaryDirectory() as tmp:
        traces = open_traces(args.traces, Path(tmp))
        model = traces.model
        workload = load_workload(traces, split_one_phase=not steady or args.split_phase)
    placement, plan = check_placement_dir(args.placement, model, topology)
    if args.policy == "class_affinity" and plan is None:
        raise InputError(args.placement, "class_affinity needs plan.json")
    params: dict[str, Any] = {
        "placement": placement,
        "class_to_node_share": None if plan is None else plan["class_to_node_share"],
        "band": args.band,
        "balance": args.balance,
    }
    if args.max_requests is not None:
        workload = workload.select(np.arange(min(args.max_requests, len(workload))))
    if steady:
        return _steady(args, workload, placement, topology, model, params)
    policy = make_policy(args.policy, **params)
    result = simulate(workload, policy, placement, topology, model, config)
    s = result.summary
    print(
        f"simulate {s.policy}: {s.requests} requests ({s.arrivals}), capacity "
        f"{config.capacity}/rank on {topology.nodes}x{topology.gpus_per_node} GPUs, "
        + (f"window {config.window_ms:g} ms" if config.window_ms else "per-request FIFO")
        + " (oracle predictions: own labels and prefill histograms)"
    )
    if workload.split_phase:
        print(f"  note: {workload.split_phase} one-phase requests split half prefill/half decode")
    rows = [
        ("steps", f"{s.steps}  ({s.tokens} tokens, {s.token_layers} token-layers)"),
        ("remote hits / token-layer", f"{s.remote_hits_per_token_layer:.3f}"),
        ("node copies / token-layer", f"{s.node_copies_per_token_layer:.3f}"),
        (
            "max-rank inter-node bytes/step",
            f"mean {s.max_rank_inter_node_bytes_mean / 1e6:.3f} MB, "
            f"p99 {s.max_rank_inter_node_bytes_p99 / 1e6:.3f} MB",
        ),
        (
            "modelled step time",
            f"mean {s.step_time_us_mean / 1e3:.3f} ms "
            f"(MoE layer {s.moe_layer_time_us_mean:.1f} us)",
        ),
        ("rank load imbalance", f"{s.rank_load_imbalance_mean:.3f} (max/mean running, mean)"),
        (
            "GPU expert-load imbalance",
            f"mean {s.gpu_load_imbalance_mean:.3f}, worst layer {s.gpu_load_imbalance_worst:.3f}",
        ),
        (
            "policy decisions",
            f"{result.decisions} in {result.policy_seconds * 1e3:.1f} ms (wall clock)",
        ),
        ("latency", f"p50 {s.latency_s_p50:.3f} s, p99 {s.latency_s_p99:.3f} s"),
        ("queue wait", f"mean {s.queue_wait_s_mean:.3f} s, p99 {s.queue_wait_s_p99:.3f} s"),
        ("makespan", f"{s.makespan_s:.3f} s (modelled)"),
    ]
    for name, value in rows:
        print(f"  {name:<32} {value}")
    if args.json:
        write_json_atomic(args.json, s.to_dict(), indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _steady(
    args: argparse.Namespace,
    workload: Any,
    placement: Any,
    topology: Any,
    model: Any,
    params: dict[str, Any],
) -> int:
    """The production-size replay of ``simulate`` (scheduler.simulation.steady)."""
    from scheduler.errors import ConfigError
    from scheduler.jsonio import write_json_atomic
    from scheduler.policies import make_policy
    from scheduler.simulation.steady import SteadyConfig, replay_steady

    phase = args.phase or (
        "both"
        if args.running_per_rank is not None and args.prefill_tokens_per_rank is not None
        else "decode"
        if args.running_per_rank is not None
        else "prefill"
    )
    phases = ["decode", "prefill"] if phase == "both" else [phase]
    if "decode" in phases and args.running_per_rank is None:
        raise ConfigError("--phase decode needs --running-per-rank N")
    if "prefill" in phases and args.prefill_tokens_per_rank is None:
        raise ConfigError("--phase prefill needs --prefill-tokens-per-rank T")
    if "decode" in phases and not (workload.decode > 0).any():
        raise ConfigError(
            f"{args.traces}: no request records decode routing (a one-phase trace, e.g. "
            "prefill only), so there are no decode steps to replay. Use --phase prefill, "
            "or --split-phase to replay each sequence's second half as decode (a proxy)"
        )
    source, workload = _predictions(args, workload, model)
    results: dict[str, Any] = {}
    for name in phases:
        try:
            config = SteadyConfig(
                phase=name,  # type: ignore[arg-type]
                running_per_rank=args.running_per_rank or 1,
                prefill_tokens_per_rank=args.prefill_tokens_per_rank or 1,
                steps=args.steps,
                seed=args.seed,
            )
        except ValueError as e:
            raise ConfigError(f"--{e}") from e
        policy = make_policy(args.policy, **params, weight=name)
        s = replay_steady(workload, policy, placement, topology, model, config, bound=args.bound)
        results[name] = {**s.to_dict(), "predictions": source}
        point = (
            f"{config.running_per_rank} running/rank"
            if name == "decode"
            else f"{config.prefill_tokens_per_rank} prompt tokens/rank/step"
        )
        print(
            f"simulate {s.policy} {name} (RESAMPLED real routing, {source} predictions): "
            f"{point} on {topology.nodes}x{topology.gpus_per_node} GPUs, {s.steps} steps, "
            f"{s.requests_drawn} requests drawn"
        )
        if workload.split_phase and name == "decode":
            print(f"  note: {workload.split_phase} one-phase requests split half/half (a proxy)")
        rows = [
            (
                "modelled MoE-layer time",
                f"{s.moe_layer_time_us_mean:.1f} us = latency {s.latency_us_mean:.1f} + bytes "
                f"{s.bytes_us_mean:.1f} + experts {s.expert_us_mean:.1f}",
            ),
            (
                "  experts (busiest GPU)",
                f"weight reads {s.weight_read_us_mean:.1f} us, FLOPs {s.flop_us_mean:.1f} us, "
                f"{s.distinct_experts_per_gpu_step_mean:.2f} distinct experts/GPU/step",
            ),
            ("node copies / token-layer", f"{s.node_copies_per_token_layer:.3f}"),
            (
                "inter-node bytes/step",
                f"busiest rank {s.max_rank_inter_node_bytes_mean / 1e6:.2f} MB, "
                f"mean rank {s.mean_rank_inter_node_bytes_mean / 1e6:.2f} MB",
            ),
            ("rank load imbalance", f"{s.rank_load_imbalance_mean:.3f} (max/mean tokens/step)"),
            ("GPU expert-load imbalance", f"mean {s.gpu_load_imbalance_mean:.3f}"),
        ]
        if args.bound:
            rows.append(
                (
                    "bound (any scheduler)",
                    f"{s.bound_moe_layer_time_us_mean:.1f} us per MoE layer on this placement",
                )
            )
        if s.fallback_assignments:
            rows.append(("policy fallbacks", f"{s.fallback_assignments} (least-loaded rank)"))
        for key, value in rows:
            print(f"  {key:<32} {value}")
    if args.json:
        out = results[phases[0]] if len(phases) == 1 else results
        write_json_atomic(args.json, out, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _predictions(args: argparse.Namespace, workload: Any, model: Any) -> tuple[str, Any]:
    """("oracle", workload) or ("bundle NAME", the workload with the bundle's predicted
    decode histograms in place of the oracle's)."""
    from dataclasses import replace

    from scheduler.errors import InputError
    from scheduler.prediction.bundle import load_bundle

    if args.predictions == "oracle":
        return "oracle", workload
    path = Path(args.predictions)
    bundle = load_bundle(path, model=model)
    if bundle.prefill_decode is None:
        raise InputError(path, "has no prefill->decode predictor (fit it on routing traces)")
    has = workload.prefill > 0
    hist = workload.histogram.astype(np.float64)
    shares = bundle.prefill_decode.predict(hist[has])  # rows sum to 1 per layer
    pairs = np.maximum(workload.decode[has], 1) * model.top_k
    hist[has] = shares * pairs[:, None, None]
    return f"bundle {path.name}", replace(workload, histogram=hist)
