"""Benchmark: every placement method x every routing policy, replayed by the simulator.

For each dataset (benchmarks/policy_grid_data.py: REAL held-out ESFT; SYNTHETIC
DeepSeek-V3-shaped requests calibrated on SGLang's published statistics; a SYNTHETIC
100k-request workload), topology, redundancy (0, 12.5%, 25% of the experts as extra
slots, where the slots divide evenly over the GPUs) and seed, every placement method is
solved on the dataset's *fit* part and every routing policy replays the *held-out*
requests with *predicted* classes / histograms, all in the same run on the same input.

Simulation settings (same for every method and policy of a case): Poisson arrivals at
70% of the saturated throughput of SGLang's default (trivial placement, round-robin,
measured first on the same workload), ``capacity`` running requests per rank, and a
scheduling window of one modelled decode step of that calibration run (every policy
decides at the same window boundaries; round_robin / total_requests / class_affinity /
locality_band decide request by request inside a window, locality_window jointly).
Placements are solved once per (dataset, topology, redundancy); seeds change the
arrival gaps (and, for the synthetic datasets, the requests themselves).

Also measured: the locality_window decision time for 1,000 queued requests.

Usage::

    python -m benchmarks.policy_grid [--data ../shared/data] [--quick]
        [--out benchmarks/results/policy_grid.json] [--figures benchmarks/figures]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import policy_grid_data as grid_data
from benchmarks.machine import machine_facts
from scheduler.model_shape import ModelShape
from scheduler.placement.topology import Topology
from scheduler.policies import POLICIES, make_policy
from scheduler.simulation import SimulationConfig, Workload, simulate

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

UTILISATION = 0.7
PEER_EXCLUDED_METHODS = ("ours", "ours-remote-hits")
OURS = ("ours", "locality_window")

#: name -> per-dataset settings. "redundancy": fractions of the experts.
GRIDS: dict[str, dict[str, Any]] = {
    "full": {
        "seeds": [0, 1],
        "time_limit_s": 3.0,
        "methods": None,  # all
        "esft-heldout": {"topologies": [(2, 4), (4, 2), (8, 2)], "capacity": 8, "max_decode": 128},
        "deepseek-v3-synthetic": {
            "topologies": [(2, 8), (4, 8), (8, 8)],
            "capacity": 8,
            "requests": 256,
            "decode_tokens": 16,
            "redundancy": [0.0],
            "extra": [(4, 8, 0.25)],
        },
        "synthetic-100k": {
            "topologies": [(4, 2)],
            "capacity": 64,
            "requests": 100_000,
            "redundancy": [0.25],
            # 100k requests x 35 combinations does not fit the 30-minute `make bench`
            "methods": ["trivial", "eplb", "ours"],
        },
        "redundancy": [0.0, 0.125, 0.25],
        "window_solve_reps": 30,
    },
    "quick": {
        "seeds": [0, 1],
        "time_limit_s": 1.0,
        "methods": ["trivial", "eplb", "ours"],
        "esft-heldout": {
            "topologies": [(2, 4)],
            "capacity": 8,
            "max_requests": 24,
            "max_decode": 32,
        },
        "deepseek-v3-synthetic": {
            "topologies": [(4, 8)],
            "capacity": 8,
            "requests": 24,
            "decode_tokens": 3,
            "redundancy": [0.0],
        },
        "synthetic-100k": {
            "topologies": [(2, 4)],
            "capacity": 8,
            "requests": 600,
            "redundancy": [0.0],
        },
        "redundancy": [0.0, 0.25],
        "window_solve_reps": 3,
    },
}


def solve_placements(
    dataset: grid_data.GridDataset,
    topology: Topology,
    redundant: int,
    methods: list[str],
    time_limit: float,
) -> dict[str, dict[str, Any]]:
    """Every method on the dataset's fit profile; failures recorded as data."""
    from scheduler.placement.methods import get_method
    from scheduler.placement.problem import PlacementProblem

    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        start = time.perf_counter()
        try:
            problem = PlacementProblem(
                dataset.profile, topology, redundant_experts=redundant, time_limit_s=time_limit
            )
            result = get_method(method)(problem)
            shares = {
                c: [float(v) for v in row]
                for c, row in zip(problem.class_names, result.class_to_node_share, strict=True)
            }
            out[method] = {
                "placement": result.placement,
                "shares": shares,
                "status": str(result.status),
                "solve_s": time.perf_counter() - start,
            }
        except Exception as e:  # a benchmark records failures as data
            out[method] = {
                "status": "error",
                "solve_s": time.perf_counter() - start,
                "message": f"{type(e).__name__}: {e}",
            }
    return out


def make(policy: str, placed: dict[str, Any]) -> Any:
    if policy == "class_affinity":
        return make_policy(policy, class_to_node_share=placed["shares"])
    if policy in ("locality_band", "locality_window"):
        return make_policy(policy, placement=placed["placement"])
    return make_policy(policy)


def calibrate(
    work: Workload, model: ModelShape, topology: Topology, capacity: int
) -> tuple[float, float]:
    """(Poisson rate, window ms): UTILISATION x the saturated throughput of SGLang's
    default on ``work`` (first 5,000 requests), and its mean modelled step."""
    from scheduler.placement.placement import Placement

    sample = work.select(np.arange(min(len(work), 5000)))
    trivial = Placement.trivial(
        model.num_moe_layers,
        model.num_experts,
        model.num_experts,
        topology.num_gpus,
        topology.gpus_per_node,
    )
    cfg = SimulationConfig(capacity=capacity, seed=0)
    s = simulate(sample, make_policy("round_robin"), trivial, topology, model, cfg).summary
    return UTILISATION * s.requests / s.makespan_s, s.makespan_s / s.steps * 1e3


SUMMARY_KEYS = (
    "requests",
    "steps",
    "tokens",
    "remote_hits_per_token_layer",
    "node_copies_per_token_layer",
    "inter_node_bytes",
    "max_rank_inter_node_bytes_mean",
    "max_rank_inter_node_bytes_p99",
    "moe_layer_time_us_mean",
    "step_time_us_mean",
    "gpu_load_imbalance_mean",
    "gpu_load_imbalance_worst",
    "rank_load_imbalance_mean",
    "rank_token_imbalance",
    "latency_s_p50",
    "latency_s_p99",
    "queue_wait_s_mean",
    "makespan_s",
)


def run_case(
    dataset: grid_data.GridDataset,
    nodes: int,
    gpus: int,
    fraction: float,
    settings: dict[str, Any],
    grid: dict[str, Any],
    methods: list[str],
) -> list[dict[str, Any]]:
    model = dataset.model
    redundant = int(round(fraction * model.num_experts))
    topology = Topology(nodes, gpus)
    base = {
        "dataset": dataset.name,
        "synthetic": dataset.synthetic,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "redundancy": fraction,
        "redundant_experts": redundant,
    }
    if (model.num_experts + redundant) % topology.num_gpus:
        return [{**base, "status": "skipped", "message": "slots do not divide over the GPUs"}]
    placed = solve_placements(dataset, topology, redundant, methods, grid["time_limit_s"])
    records = []
    for seed in grid["seeds"]:
        work = dataset.workload(seed)
        if settings.get("max_requests"):
            work = work.select(np.arange(min(settings["max_requests"], len(work))))
        rate, window_ms = calibrate(work, model, topology, settings["capacity"])
        cfg = SimulationConfig(
            capacity=settings["capacity"], rate=rate, seed=seed, window_ms=window_ms
        )
        for method in methods:
            p = placed[method]
            for policy in POLICIES:
                rec: dict[str, Any] = {
                    **base,
                    "seed": seed,
                    "method": method,
                    "policy": policy,
                    "placement_status": p["status"],
                    "placement_solve_s": p["solve_s"],
                    "rate_per_s": rate,
                    "window_ms": window_ms,
                    "capacity": settings["capacity"],
                }
                if p["status"] == "error":
                    records.append({**rec, "status": "error", "message": p["message"]})
                    continue
                start = time.perf_counter()
                try:
                    result = simulate(work, make(policy, p), p["placement"], topology, model, cfg)
                except Exception as e:
                    traceback.print_exc()
                    records.append(
                        {**rec, "status": "error", "message": f"{type(e).__name__}: {e}"}
                    )
                    continue
                s = result.summary.to_dict()
                decisions = np.asarray(result.decision_seconds) * 1e3
                rec.update(
                    status="ok",
                    sim_wall_s=time.perf_counter() - start,
                    policy_ms_total=result.policy_seconds * 1e3,
                    decisions=result.decisions,
                    decision_ms_p99=float(np.percentile(decisions, 99)) if decisions.size else 0.0,
                    **{k: s[k] for k in SUMMARY_KEYS},
                )
                records.append(rec)
        print(
            f"  {dataset.name} {nodes}x{gpus} R={redundant} seed {seed}: "
            f"{len(methods) * len(POLICIES)} runs, rate {rate:.0f}/s, window {window_ms:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
    return records


def window_solve_times(reps: int) -> list[dict[str, Any]]:
    """locality_window's decision time for a window of 1,000 queued requests (random
    placements and histograms: a timing, not a workload)."""
    from scheduler.placement.placement import Placement
    from scheduler.policies import RankState, RequestInfo

    out = []
    for layers, experts, nodes, gpus in ((26, 64, 4, 2), (58, 256, 8, 8)):
        rng = np.random.default_rng(0)
        perm = np.array([rng.permutation(experts) for _ in range(layers)])
        placement = Placement(perm, experts, nodes * gpus, gpus)
        for distinct in (4, 1000):
            hists = [
                rng.integers(0, 5, (layers, experts)).astype(np.float64) for _ in range(distinct)
            ]
            requests = [RequestInfo(str(i), None, hists[i % distinct], 10) for i in range(1000)]
            ranks = RankState(
                np.zeros(nodes * gpus, np.int64),
                np.zeros(nodes * gpus, np.int64),
                -(-1000 // (nodes * gpus)),
                gpus,
            )
            policy = make_policy("locality_window", placement=placement)
            start = time.perf_counter()
            policy.choose_ranks(requests, ranks)  # cold: scores every histogram once
            cold = time.perf_counter() - start
            warm = []
            for _ in range(reps):
                start = time.perf_counter()
                chosen = policy.choose_ranks(requests, ranks)
                warm.append(time.perf_counter() - start)
            assert all(c is not None for c in chosen)
            out.append(
                {
                    "shape": f"{layers} layers x {experts} experts, {nodes}x{gpus} GPUs",
                    "requests": 1000,
                    "distinct_histograms": distinct,
                    "cold_ms": cold * 1e3,
                    "warm_ms_median": float(np.median(warm)) * 1e3,
                    "warm_ms_p99": float(np.percentile(warm, 99)) * 1e3,
                    "target_ms": 10.0,
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    from scheduler.placement.methods import method_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--quick", action="store_true", help="tiny grid: a smoke test, not numbers")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "policy_grid.json")
    parser.add_argument("--figures", type=Path, default=BENCH_DIR / "figures")
    args = parser.parse_args(argv)
    grid = GRIDS["quick" if args.quick else "full"]
    methods = grid["methods"] or method_names()
    wall = time.perf_counter()
    # Timed first, before the grid's workloads are loaded, so the timing does not depend
    # on what the grid left in memory.
    solve = window_solve_times(grid["window_solve_reps"])
    esft = grid_data.load_esft(args.data)
    esft_ds, alpha = grid_data.esft_dataset(esft, grid["esft-heldout"].get("max_decode"))
    v3 = grid["deepseek-v3-synthetic"]
    datasets = [
        esft_ds,
        grid_data.v3_dataset(args.data, alpha, v3["requests"], v3["decode_tokens"]),
        grid_data.synthetic_100k(esft, alpha, grid["synthetic-100k"]["requests"]),
    ]
    records: list[dict[str, Any]] = []
    for dataset in datasets:
        settings = grid[dataset.name]
        print(f"{dataset.name}: {dataset.note}", file=sys.stderr, flush=True)
        cases = [
            (nodes, gpus, fraction)
            for nodes, gpus in settings["topologies"]
            for fraction in settings.get("redundancy", grid["redundancy"])
        ] + list(settings.get("extra", []))
        chosen = [m for m in methods if m in settings.get("methods", methods)]
        for nodes, gpus, fraction in cases:
            records += run_case(dataset, nodes, gpus, fraction, settings, grid, chosen)
    result = {
        "benchmark": "policy_grid",
        "quick": args.quick,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.policy_grid " + " ".join(argv or sys.argv[1:]),
        "machine": machine_facts("numpy", "ortools"),
        "utilisation": UTILISATION,
        "datasets": [
            {"name": d.name, "synthetic": d.synthetic, "note": d.note, **d.facts} for d in datasets
        ],
        "methods": methods,
        "policies": list(POLICIES),
        "seeds": grid["seeds"],
        "records": records,
        "window_solve": solve,
        "wall_s": time.perf_counter() - wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s", file=sys.stderr)
    try:
        from benchmarks.policy_grid_plots import plot_all

        for path in plot_all(result, args.figures):
            print(f"wrote {path}", file=sys.stderr)
    except Exception:  # figures are a convenience; the JSON is the result
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
