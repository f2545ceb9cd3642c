"""Benchmark: the policy grid at production sizes, with the limit any scheduler could reach.

The policy grid (benchmarks/policy_grid.py) replays a few hundred held-out requests at
~8 running requests per rank, where the fixed kernel latency hides every placement and
policy. This benchmark replays the same datasets (benchmarks/policy_grid_data.py, with
their *held-out predictions*) at production operating points with the steady replay
(:mod:`scheduler.simulation.steady`): decode with 64 / 128 / 256 running requests per
DP rank and chunked prefill of 8,192 tokens per rank (2,048 for the DeepSeek-V3-shaped
workload, whose 8x8 steps would otherwise be ~500k tokens each), every placement method
x every routing policy, each with :class:`~scheduler.simulation.steady.StepBound`, a
proven lower bound over every assignment of a step's tokens to ranks on that placement.

Requests are drawn with replacement from the held-out requests (each keeps its own
routing), so every figure is **resampled**: "resampled real" for ESFT, "resampled
synthetic" for the V3-shaped workload. ESFT sequences are one phase: their first half
is the prompt and the rest the decode, as in the grid (a proxy). The policies see the
grid's held-out predictions (class and decode histogram predicted from the prompt's
routing by predictors fitted on other requests) in both phases.

Bounds: decode steps' token sets do not depend on the policy, so the decode bound is
computed once per placement over the same steps (exact for every policy of it); prefill
steps depend on the assignment (which prompts a rank's chunk holds), so the prefill
bound is computed on round_robin's run per placement and labelled so.

Also per case: the latency / bytes / expert split of SGLang's default (``trivial`` +
``round_robin``) at the old grid's small-batch point (8 running per rank) against the
production points.

Usage::

    python -m benchmarks.policy_grid_production [--data ../shared/data] [--quick]
        [--out benchmarks/results/policy_grid_production.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import policy_grid_data as grid_data
from benchmarks.machine import machine_facts
from benchmarks.policy_grid import make, solve_placements
from scheduler.accounting import CostModel
from scheduler.placement.topology import Topology
from scheduler.policies import POLICIES, make_policy
from scheduler.profile import ClassProfile, WorkloadProfile
from scheduler.simulation import Workload
from scheduler.simulation.steady import (
    SteadyConfig,
    StepBound,
    decode_timeline,
    replay_steady,
)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

OURS = ("ours", "locality_window")
SGLANG_DEFAULT = ("trivial", "round_robin")
EPLB = ("eplb", "round_robin")
SEED = 0
#: "ours" placed on the replayed requests' own decode routing (by the labels the policies
#: see): the best placement found for the true workload, served by locality_window.
ORACLE = "oracle"
#: Extra settings of locality_window's one knob, run with our placement only.
BALANCE_VARIANTS = (0.0, 1.0)

#: name -> settings. Per dataset: topologies, redundant experts (kept where the slots
#: divide over the GPUs), steps per decode / prefill run, the prefill chunk per rank.
GRIDS: dict[str, dict[str, Any]] = {
    "full": {
        # the CLI's default: what `moe-scheduler place` spends unless told otherwise
        "time_limit_s": 30.0,
        "methods": None,  # all
        "decode_running": [64, 128, 256],
        "small_batch_running": 8,
        "esft-heldout": {
            "topologies": [(2, 4), (4, 2), (8, 2)],
            "redundant": [0, 16],
            "decode_steps": 32,
            "prefill_tokens": 8192,
            "prefill_steps": 4,
        },
        "deepseek-v3-synthetic": {
            "topologies": [(4, 8), (8, 8)],
            "redundant": [0],
            "requests": 256,
            "request_prefill_tokens": 256,
            "request_decode_tokens": 64,
            "decode_steps": 8,
            "prefill_tokens": 2048,
            "prefill_steps": 2,
        },
    },
    "quick": {
        "time_limit_s": 1.0,
        "methods": ["trivial", "eplb", "ours"],
        "decode_running": [128],
        "small_batch_running": 8,
        "esft-heldout": {
            "topologies": [(2, 4)],
            "redundant": [0],
            "decode_steps": 4,
            "prefill_tokens": 1024,
            "prefill_steps": 1,
        },
        "deepseek-v3-synthetic": {
            "topologies": [(4, 8)],
            "redundant": [0],
            "requests": 24,
            "request_prefill_tokens": 32,
            "request_decode_tokens": 8,
            "decode_steps": 2,
            "prefill_tokens": 128,
            "prefill_steps": 1,
        },
    },
}

#: SteadySummary fields kept per record.
SUMMARY_KEYS = (
    "steps",
    "tokens",
    "requests_drawn",
    "fallback_assignments",
    "moe_layer_time_us_mean",
    "latency_us_mean",
    "bytes_us_mean",
    "expert_us_mean",
    "weight_read_us_mean",
    "flop_us_mean",
    "distinct_experts_per_gpu_step_mean",
    "node_copies_per_token_layer",
    "remote_hits_per_token_layer",
    "max_rank_inter_node_bytes_mean",
    "mean_rank_inter_node_bytes_mean",
    "rank_load_imbalance_mean",
    "gpu_load_imbalance_mean",
    "gpu_load_imbalance_worst",
)
SPLIT_KEYS = (
    "moe_layer_time_us_mean",
    "latency_us_mean",
    "bytes_us_mean",
    "expert_us_mean",
    "weight_read_us_mean",
    "flop_us_mean",
    "distinct_experts_per_gpu_step_mean",
    "max_rank_inter_node_bytes_mean",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def figures_label(dataset: grid_data.GridDataset) -> str:
    return "resampled synthetic" if dataset.synthetic else "resampled real"


def operating_points(settings: dict[str, Any], grid: dict[str, Any]) -> list[SteadyConfig]:
    """The replayed operating points of a dataset: decode at each N, then prefill."""
    points = [
        SteadyConfig("decode", running_per_rank=n, steps=settings["decode_steps"], seed=SEED)
        for n in grid["decode_running"]
    ]
    points.append(
        SteadyConfig(
            "prefill",
            prefill_tokens_per_rank=settings["prefill_tokens"],
            steps=settings["prefill_steps"],
            seed=SEED,
        )
    )
    return points


def point_name(config: SteadyConfig) -> str:
    if config.phase == "decode":
        return f"decode_{config.running_per_rank}"
    return f"prefill_{config.prefill_tokens_per_rank}"


def decode_bound(
    work: Workload, bound: StepBound, topology: Topology, config: SteadyConfig
) -> float:
    """The decode bound of ``config``'s steps (the same steps for every policy)."""
    _, tokens, _ = decode_timeline(work, topology.num_gpus, config)
    return float(np.mean([bound(work.token_ids[index]) for index in tokens]))


def variant_name(balance: float) -> str:
    return f"{OURS[1]}[balance={balance:g}]"


def make_variant(policy: str, placed: dict[str, Any], phase: str) -> Any:
    """:func:`policy_grid.make`, plus the ``locality_window[balance=B]`` variants;
    locality_window weighs requests for ``phase`` (a decode step holds one token of
    every running request, a prefill chunk whole prompts)."""
    if policy.startswith(OURS[1]):
        balance = float(policy.split("=", 1)[1].rstrip("]")) if "[" in policy else None
        return make_policy(OURS[1], placement=placed["placement"], weight=phase, balance=balance)
    return make(policy, placed)


def policies_of(method: str) -> list[str]:
    if method == ORACLE:
        return [OURS[1]]
    if method == OURS[0]:
        return list(POLICIES) + [variant_name(b) for b in BALANCE_VARIANTS]
    return list(POLICIES)


def oracle_profile(work: Workload, model: Any) -> WorkloadProfile:
    """The replayed requests' own decode routing as a profile, one class per label the
    policies see (token shares as weights)."""
    e = model.num_experts
    counts: dict[str, np.ndarray] = {}
    for i, label in enumerate(work.labels):
        start = int(work.offset[i] + work.prefill[i])
        ids = work.token_ids[start : start + int(work.decode[i])]  # [tokens, layers, k]
        layer = np.broadcast_to(np.arange(ids.shape[1])[None, :, None], ids.shape)
        cell = (layer * e + ids.astype(np.int64)).ravel()
        c = np.bincount(cell, minlength=ids.shape[1] * e).reshape(ids.shape[1], e)
        key = label or "unlabelled"
        counts[key] = counts.get(key, 0) + c
    total = sum(float(c.sum()) for c in counts.values())
    classes = {
        k: ClassProfile(float(c.sum()) / total, {"decode": c.astype(np.float64)})
        for k, c in sorted(counts.items())
    }
    return WorkloadProfile(model, classes, {"source": "replayed requests (oracle)"})


def run_case(
    dataset: grid_data.GridDataset,
    work: Workload,
    nodes: int,
    gpus: int,
    redundant: int,
    settings: dict[str, Any],
    grid: dict[str, Any],
    methods: list[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every method x policy x operating point of one case; the case's bounds and
    small-batch split."""
    model = dataset.model
    topology = Topology(nodes, gpus)
    cost = CostModel.from_topology(topology)
    figures = figures_label(dataset)
    base = {
        "dataset": dataset.name,
        "synthetic": dataset.synthetic,
        "figures": figures,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "redundant_experts": redundant,
    }
    case: dict[str, Any] = {**base, "status": "ok"}
    if (model.num_experts + redundant) % topology.num_gpus:
        return {**case, "status": "skipped", "message": "slots do not divide over the GPUs"}, []
    start = time.perf_counter()
    placed = solve_placements(dataset, topology, redundant, methods, grid["time_limit_s"])
    if OURS[0] in methods:
        oracle = replace(dataset, profile=oracle_profile(work, model))
        placed[ORACLE] = solve_placements(
            oracle, topology, redundant, [OURS[0]], grid["time_limit_s"]
        )[OURS[0]]
        methods = [*methods, ORACLE]
    case["placements"] = {
        m: {k: v for k, v in p.items() if k in ("status", "solve_s", "message")}
        for m, p in placed.items()
    }
    log(
        f"  {dataset.name} {nodes}x{gpus} R={redundant}: placements solved in "
        f"{time.perf_counter() - start:.1f} s"
    )
    points = operating_points(settings, grid)
    bounds: dict[str, dict[str, float]] = {}
    records: list[dict[str, Any]] = []
    for method in methods:
        p = placed[method]
        method_start = time.perf_counter()
        if p["status"] == "error":
            for config in points:
                for policy in policies_of(method):
                    records.append(
                        {
                            **base,
                            "method": method,
                            "policy": policy,
                            "phase": config.phase,
                            "point": point_name(config),
                            "status": "error",
                            "message": p["message"],
                        }
                    )
            continue
        step_bound = StepBound(p["placement"], model, cost)
        bounds[method] = {}
        for config in points:
            if config.phase == "decode":
                bounds[method][point_name(config)] = decode_bound(
                    work, step_bound, topology, config
                )
            for policy in policies_of(method):
                rec: dict[str, Any] = {
                    **base,
                    "method": method,
                    "policy": policy,
                    "phase": config.phase,
                    "point": point_name(config),
                    "running_per_rank": config.running_per_rank
                    if config.phase == "decode"
                    else None,
                    "prefill_tokens_per_rank": config.prefill_tokens_per_rank
                    if config.phase == "prefill"
                    else None,
                    "placement_status": p["status"],
                }
                # the prefill bound: on round_robin's run (its steps' tokens)
                with_bound = config.phase == "prefill" and policy == "round_robin"
                run_start = time.perf_counter()
                try:
                    s = replay_steady(
                        work,
                        make_variant(policy, p, config.phase),
                        p["placement"],
                        topology,
                        model,
                        config,
                        cost,
                        bound=with_bound,
                    ).to_dict()
                except Exception as e:  # a benchmark records failures as data
                    traceback.print_exc()
                    records.append(
                        {**rec, "status": "error", "message": f"{type(e).__name__}: {e}"}
                    )
                    continue
                if with_bound:
                    bound_us = s["bound_moe_layer_time_us_mean"]
                    assert isinstance(bound_us, float)
                    bounds[method][point_name(config)] = bound_us
                rec.update(
                    status="ok",
                    wall_s=time.perf_counter() - run_start,
                    **{k: s[k] for k in SUMMARY_KEYS},
                )
                records.append(rec)
        log(
            f"    {method}: {len(points) * len(policies_of(method))} runs in "
            f"{time.perf_counter() - method_start:.1f} s"
        )
    for rec in records:  # the bound of the record's placement and operating point
        rec["bound_moe_layer_time_us_mean"] = bounds.get(rec["method"], {}).get(rec["point"])
    case["bounds"] = bounds
    case["small_batch"] = small_batch(work, placed, topology, model, cost, settings, grid, records)
    case["wall_s"] = time.perf_counter() - start
    log(f"  {dataset.name} {nodes}x{gpus} R={redundant}: done in {case['wall_s']:.1f} s")
    return case, records


def small_batch(
    work: Workload,
    placed: dict[str, dict[str, Any]],
    topology: Topology,
    model: Any,
    cost: CostModel,
    settings: dict[str, Any],
    grid: dict[str, Any],
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """SGLang's default's latency / bytes / expert split at the old grid's small-batch
    point (``small_batch_running`` per rank, decode) and at the production points."""
    out: dict[str, Any] = {"method": SGLANG_DEFAULT[0], "policy": SGLANG_DEFAULT[1]}
    if placed.get(SGLANG_DEFAULT[0], {}).get("status") in (None, "error"):
        return {**out, "status": "error", "message": "no trivial placement"}
    p = placed[SGLANG_DEFAULT[0]]
    config = SteadyConfig(
        "decode",
        running_per_rank=grid["small_batch_running"],
        steps=settings["decode_steps"],
        seed=SEED,
    )
    s = replay_steady(
        work, make(SGLANG_DEFAULT[1], p), p["placement"], topology, model, config, cost
    ).to_dict()
    points = {point_name(config): {k: s[k] for k in SPLIT_KEYS}}
    for rec in records:
        if (rec["method"], rec["policy"]) == SGLANG_DEFAULT and rec["status"] == "ok":
            points[rec["point"]] = {k: rec[k] for k in SPLIT_KEYS}
    return {**out, "status": "ok", "small_batch_point": point_name(config), "points": points}


def load_datasets(data: Path, grid: dict[str, Any]) -> list[grid_data.GridDataset]:
    esft = grid_data.load_esft(data)
    esft_ds, alpha = grid_data.esft_dataset(esft, None, two_phase=True)
    esft_ds.note = (
        "REAL ESFT routing (DeepSeek-V2-Lite shape); placements fitted on the even "
        "sequences; replayed: the odd sequences, each split into a prompt (first half) and "
        "decode steps (second half), a proxy since ESFT records one teacher-forced phase; "
        "class and decode-histogram predictions from each prompt's routing (ridge, fitted "
        "on the even sequences)"
    )
    v3 = grid["deepseek-v3-synthetic"]
    v3_ds = grid_data.v3_dataset(
        data,
        alpha,
        v3["requests"],
        v3["request_decode_tokens"],
        v3["request_prefill_tokens"],
        two_phase=True,
    )
    v3_ds.note = (
        "SYNTHETIC DeepSeek-V3-shaped requests calibrated on SGLang's published decode "
        "statistics (4 workloads = classes; per-request dispersion calibrated on ESFT), "
        f"{v3['request_prefill_tokens']} prompt + {v3['request_decode_tokens']} decode "
        "tokens each; predictions from each prompt's routing (ridge, fitted on separate "
        "synthetic requests)"
    )
    return [esft_ds, v3_ds]


def main(argv: list[str] | None = None) -> int:
    from scheduler.placement.methods import method_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--quick", action="store_true", help="tiny grid: a smoke test, not numbers")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results" / "policy_grid_production.json"
    )
    args = parser.parse_args(argv)
    grid = GRIDS["quick" if args.quick else "full"]
    methods = grid["methods"] or method_names()
    wall = time.perf_counter()
    datasets = load_datasets(args.data, grid)
    log(f"datasets loaded in {time.perf_counter() - wall:.1f} s")
    cases: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for dataset in datasets:
        settings = grid[dataset.name]
        log(f"{dataset.name} ({figures_label(dataset)}): {dataset.note}")
        work = dataset.workload(SEED)
        for nodes, gpus in settings["topologies"]:
            for redundant in settings["redundant"]:
                case, recs = run_case(
                    dataset, work, nodes, gpus, redundant, settings, grid, methods
                )
                cases.append(case)
                records += recs
    gpu = Topology(1, 1)
    result = {
        "benchmark": "policy_grid_production",
        "quick": args.quick,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.policy_grid_production " + " ".join(argv or sys.argv[1:]),
        "machine": machine_facts("numpy", "ortools"),
        "settings": {
            "seed": SEED,
            "time_limit_s": grid["time_limit_s"],
            "decode_running_per_rank": grid["decode_running"],
            "small_batch_running_per_rank": grid["small_batch_running"],
            "datasets": {d.name: grid[d.name] for d in datasets},
            "cost_model": {
                "gpu": gpu.gpu.name,
                "expert_weights": gpu.expert_weights,
                "inter_node_gbps": gpu.inter_node_gbps,
                "intra_node_gbps": gpu.intra_node_gbps,
                "source": "scheduler/accounting/cost_model.py, CostModel.from_topology",
            },
            "bounds": {
                "decode": "StepBound over the decode steps, once per placement (the steps' "
                "tokens do not depend on the policy: the bound of every policy's run)",
                "prefill": "StepBound over round_robin's prefill steps, per placement",
            },
            "predictions": "held-out (policy_grid_data): class and decode histogram "
            "predicted from each prompt's routing, in both phases",
        },
        "datasets": [
            {
                "name": d.name,
                "synthetic": d.synthetic,
                "figures": figures_label(d),
                "note": d.note,
                **d.facts,
            }
            for d in datasets
        ],
        "methods": methods,
        "policies": list(POLICIES),
        "special": {
            "ours": list(OURS),
            "oracle": [ORACLE, OURS[1]],
            "balance_variants": [variant_name(b) for b in BALANCE_VARIANTS],
            "sglang_default": list(SGLANG_DEFAULT),
            "eplb": list(EPLB),
        },
        "cases": cases,
        "records": records,
        "wall_s": time.perf_counter() - wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
