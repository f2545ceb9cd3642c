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
        "predictors instead. With --window-ms > 0 the queue is decided jointly at window "
        "boundaries (docs/policies.md). Traces with one phase only (ESFT) are split: "
        "first half prefill, second half decode steps (a proxy).",
    )
    p.add_argument("--traces", type=Path, required=True, help="trace store or importable input")
    p.add_argument("--placement", type=Path, required=True, help="placement directory (place)")
    p.add_argument("--topology", type=Path, required=True, help="topology TOML (design.md)")
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
        "--slack",
        type=float,
        default=0.1,
        help="locality_window: how far above its fair share of the load a node may go "
        "(default 0.1)",
    )
    p.add_argument(
        "--window-ms",
        type=float,
        default=0.0,
        help="scheduling window in modelled ms: the queue is decided together at each "
        "boundary (default 0: each request alone, FIFO)",
    )
    p.add_argument("--seed", type=int, default=0, help="arrival order and gaps (default 0)")
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
            capacity=args.capacity, rate=args.rate, seed=args.seed, window_ms=args.window_ms
        )
    except ValueError as e:
        raise ConfigError(f"--{e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        traces = open_traces(args.traces, Path(tmp))
        model = traces.model
        workload = load_workload(traces)
    placement, plan = check_placement_dir(args.placement, model, topology)
    params: dict[str, Any] = {}
    if args.policy == "class_affinity":
        if plan is None:
            raise InputError(args.placement, "class_affinity needs plan.json")
        params["class_to_node_share"] = plan["class_to_node_share"]
    elif args.policy == "locality_band":
        params = {"placement": placement, "band": args.band}
    elif args.policy == "locality_window":
        params = {"placement": placement, "slack": args.slack}
    policy = make_policy(args.policy, **params)
    if args.max_requests is not None:
        workload = workload.select(np.arange(min(args.max_requests, len(workload))))
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
