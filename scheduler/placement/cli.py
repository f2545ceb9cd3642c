"""``moe-scheduler place``: solve a placement, or check one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_commands(sub: Any) -> None:
    from scheduler.placement.methods import METHODS
    from scheduler.placement.problem import OBJECTIVES
    from scheduler.placement.step_time import DEFAULT_TOKENS, PHASES

    p = sub.add_parser(
        "place",
        help="place experts on GPUs and classes on nodes (writes SGLang's expert_location.json)",
        description="Solve a placement for a workload profile on a topology, writing "
        "DIR/expert_location.json (SGLang --init-expert-location) and DIR/plan.json; or "
        "validate an existing placement directory with --check DIR (which also refuses a "
        "model whose SGLang class ignores expert placements, such as Mixtral).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", type=Path, help="workload profile JSON")
    source.add_argument(
        "--from-server",
        metavar="HOST:PORT",
        help="use the profile a running scheduler measured from routed experts (its "
        "GetFeedback RPC) instead of --profile; it is also written to DIR.profile.json",
    )
    p.add_argument("--topology", type=Path, required=True, help="topology TOML (docs/placement.md)")
    p.add_argument("--out", type=Path, help="placement directory to write")
    p.add_argument("--check", type=Path, metavar="DIR", help="validate an existing placement")
    p.add_argument(
        "--method",
        default="ours",
        choices=list(METHODS),
        help="placement method (default: ours); "
        + "; ".join(f"{k}: {v[2]}" for k, v in METHODS.items()),
    )
    p.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="extra physical slots per MoE layer (SGLang --ep-num-redundant-experts)",
    )
    p.add_argument(
        "--balance-tolerance",
        type=float,
        default=0.10,
        help="max GPU expert load and node request load over the mean (default 0.10)",
    )
    p.add_argument(
        "--time-limit", type=float, default=30.0, help="solver time budget in seconds (default 30)"
    )
    p.add_argument("--seed", type=int, default=0, help="solver random seed (default 0)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="CP-SAT threads (default 1: runs repeat exactly; more are faster, not reproducible)",
    )
    p.add_argument(
        "--objective",
        default=OBJECTIVES[0],
        choices=list(OBJECTIVES),
        help="what --method ours minimises: the modelled MoE-layer time at the operating "
        "point (default; busiest rank and GPU included, mean bytes second) or, for "
        "comparison, the expected remote (token, expert) hits",
    )
    p.add_argument(
        "--phase",
        default=PHASES[0],
        choices=list(PHASES),
        help="operating point of --objective time (default decode)",
    )
    p.add_argument(
        "--tokens-per-rank",
        type=int,
        help="tokens per DP rank per step at the operating point (default: "
        f"{DEFAULT_TOKENS['decode']} running requests in decode, "
        f"{DEFAULT_TOKENS['prefill']} prompt tokens in prefill)",
    )
    p.add_argument(
        "--current",
        type=Path,
        metavar="DIR",
        help="re-placement: the placement directory now in use",
    )
    p.add_argument(
        "--max-moves",
        type=int,
        help="re-placement: at most this many expert weights moved (needs --current)",
    )
    p.set_defaults(handler=cmd_place)


def cmd_place(args: argparse.Namespace) -> int:
    from scheduler.errors import ConfigError
    from scheduler.placement.io import fingerprint
    from scheduler.placement.methods import get_method
    from scheduler.placement.metrics import predicted_metrics
    from scheduler.placement.plan import check_placement_dir, write_placement_dir
    from scheduler.placement.problem import PlacementProblem
    from scheduler.placement.step_time import OperatingPoint
    from scheduler.placement.topology import load_topology
    from scheduler.profile import load_profile

    if args.from_server:
        if not args.out:
            raise ConfigError("--from-server needs --out DIR")
        from scheduler.client import save_feedback_profile  # the client layer, not placement

        args.profile = save_feedback_profile(args.from_server, args.out)
    profile = load_profile(args.profile)
    topology = load_topology(args.topology)
    if args.check:
        from scheduler.sglang_versions import check_expert_location

        # A placement SGLang would ignore is not valid, however well it fits the model.
        warning = check_expert_location(profile.model.name)
        if warning is not None:
            print(f"moe-scheduler: warning: {warning}", file=sys.stderr)
        placement, plan = check_placement_dir(args.check, profile.model, topology)
        shares = None
        if plan is not None:
            missing = set(profile.classes) - set(plan["class_to_node_share"])
            if missing:
                raise ConfigError(
                    f"{args.check}/plan.json has no shares for classes {sorted(missing)}"
                )
            import numpy as np

            shares = np.array([plan["class_to_node_share"][c] for c in profile.classes])
        print(
            f"{args.check}: valid placement for {profile.model.name} on "
            f"{topology.nodes}x{topology.gpus_per_node} GPUs "
            f"({placement.num_slots} slots per layer, {placement.slots_per_gpu} per GPU)"
        )
        if shares is not None:
            problem = PlacementProblem(
                profile, topology, redundant_experts=placement.num_slots - profile.model.num_experts
            )
            metrics = predicted_metrics(
                problem.demand, problem.weights, profile.model, placement, shares, topology
            )
            for key, value in metrics.items():
                print(f"  {key}: {value:.4f}")
        return 0
    if args.out is None:
        raise ConfigError("place needs --out DIR (or --check DIR)")
    current = None
    if args.current is not None:
        current, _ = check_placement_dir(args.current, profile.model, topology)
    problem = PlacementProblem(
        profile,
        topology,
        redundant_experts=args.redundant_experts,
        balance_tolerance=args.balance_tolerance,
        time_limit_s=args.time_limit,
        seed=args.seed,
        workers=args.workers,
        current=current,
        max_moves=args.max_moves,
        objective=args.objective,
        operating_point=OperatingPoint.of(args.phase, args.tokens_per_rank),
    )
    print(
        f"placing {profile.model.num_experts} experts x {profile.model.num_moe_layers} layers "
        f"(+{args.redundant_experts} redundant) on {topology.nodes}x{topology.gpus_per_node} "
        f"GPUs with method {args.method} ...",
        file=sys.stderr,
    )
    result = get_method(args.method)(problem)
    fingerprints = {
        "profile_sha256": fingerprint(args.profile),
        "topology_sha256": fingerprint(args.topology),
    }
    if current is not None:
        fingerprints["current_sha256"] = fingerprint(args.current / "expert_location.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_placement_dir(args.out, problem, result, fingerprints)
    relaxed = result.details.get("balance_relaxed")
    if relaxed:
        by_layer = relaxed["gpu_load_imbalance_by_layer"]
        shown = ", ".join(
            f"layer {layer} {value:.2f}" for layer, value in list(by_layer.items())[:8]
        )
        print(
            f"BALANCE_RELAXED: GPU expert load above +{problem.balance_tolerance:.0%} of the "
            f"mean in {len(by_layer)} MoE layer(s) (max/mean: {shown}"
            f"{', ...' if len(by_layer) > 8 else ''}); the best-balanced placement found is "
            "written. More --redundant-experts lets a hot expert be split further.",
            file=sys.stderr,
        )
    gap = f", gap {result.gap:.2%} to the joint bound" if result.gap is not None else ""
    print(
        f"wrote {args.out}/expert_location.json and plan.json ({result.status}, "
        f"{result.solve_seconds:.1f} s{gap})"
    )
    return 0
