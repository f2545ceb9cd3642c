"""Benchmark: every placement method side by side on real data, in one run.

Cases:

* **ESFT held-out** (DeepSeek-V2-Lite, 4 domains): profiles are fitted on the even-numbered
  sequences of each domain and every method is measured on the odd-numbered ones, with
  each class's held-out requests served where the method's class-to-node shares send them
  (the class is the sequence's real domain label: oracle classification; the front-end's
  classifier comes later). 4 nodes x 2 GPUs, 0 and 16 redundant experts (25% of slots).
* **DeepSeek-V3 statistics** (SGLang's published per-workload counts, 8 workload classes;
  aggregates, so fit and measure are the same data): 4 x 8 GPUs with 0 and 32 redundant
  experts (time limit 5 s) and 32 x 8 GPUs without (60 s).

Metrics are the plan's predicted metrics (scheduler.placement.metrics: expected values
under SGLang's static dispatch). Failures (infeasible inputs, errors) are recorded as data.

Usage::

    python -m benchmarks.placement [--data ../shared/data] [--out benchmarks/results/placement.json]
        [--methods ours,trivial,...] [--cases esft,deepseek-v3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_facts

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def _split_esft(data: Path, workdir: Path) -> tuple[Any, Any]:
    """Fit / held-out profiles of the ESFT traces: even / odd sequence index per domain."""
    from scheduler.profile import build_profile
    from scheduler.traces.importers import esft
    from scheduler.traces.store import TraceSet, TraceWriter

    source = esft.read(data / "traces" / "esft-deepseek-v2-lite", None)
    halves = {}
    with (
        TraceWriter(workdir / "fit", source.model, source=source.provenance) as fit,
        TraceWriter(workdir / "test", source.model, source=source.provenance) as test,
    ):
        for record in source.records:
            index = int(record.request_id.rsplit("/", 1)[1])
            record.token_ids, record.gate_weights = {}, {}
            (fit if index % 2 == 0 else test).add(record)
    for name in ("fit", "test"):
        halves[name] = build_profile(TraceSet(workdir / name), by="label")
    return halves["fit"], halves["test"]


def _deepseek_profile(data: Path, workdir: Path) -> Any:
    from scheduler.profile import build_profile
    from scheduler.traces.importers import import_traces

    traces = import_traces(data / "traces" / "sglang-deepseek-v3-eplb-stats", workdir / "ds")
    return build_profile(traces, by="label")


def _run(
    method: str, fit: Any, test: Any, nodes: int, gpus: int, redundant: int, time_limit: float
) -> dict[str, Any]:
    from dataclasses import replace

    import numpy as np

    from scheduler.errors import MoeSchedulerError
    from scheduler.placement.methods import get_method
    from scheduler.placement.metrics import predicted_metrics
    from scheduler.placement.plan import modelled_step
    from scheduler.placement.problem import PlacementProblem
    from scheduler.placement.topology import Topology

    record: dict[str, Any] = {
        "method": method,
        "nodes": nodes,
        "gpus_per_node": gpus,
        "redundant_experts": redundant,
        "time_limit_s": time_limit,
    }
    start = time.perf_counter()
    try:
        topology = Topology(nodes, gpus)
        problem = PlacementProblem(
            fit, topology, redundant_experts=redundant, time_limit_s=time_limit
        )
        result = get_method(method)(problem)
        held_out = PlacementProblem(test, topology, redundant_experts=redundant)
        # shares are per class name; the held-out profile has the same classes
        order = [problem.class_names.index(c) for c in held_out.class_names]
        shares = result.class_to_node_share[order]
        metrics = predicted_metrics(
            held_out.demand, held_out.weights, test.model, result.placement, shares, topology
        )
        # the modelled MoE-layer time at decode, 128 running per rank, on the held-out
        # profile (placement/step_time.py; the same model for every method)
        metrics.update(
            modelled_step(held_out, replace(result, class_to_node_share=np.asarray(shares)))
        )
        record.update(
            status=result.status,
            seconds=time.perf_counter() - start,
            objective=result.objective,
            bound=result.bound,
            gap=result.gap,
            metrics=metrics,
            shares_nonzero=int((np.asarray(shares) > 1e-6).sum()),
        )
    except MoeSchedulerError as e:
        record.update(
            status="error", seconds=time.perf_counter() - start, message=f"{type(e).__name__}: {e}"
        )
    except Exception as e:  # a benchmark records failures as data
        record.update(
            status="error", seconds=time.perf_counter() - start, message=f"{type(e).__name__}: {e}"
        )
    m = record.get("metrics", {})
    print(
        f"  {method:18s} {nodes}x{gpus} R={redundant:<3d} {record['status']:10s} "
        f"{record['seconds']:6.1f}s remote/tok-layer "
        f"{m.get('remote_hits_per_token_layer', float('nan')):.3f} balancedness "
        f"{m.get('balancedness_mean', float('nan')):.3f} modelled "
        f"{m.get('modelled_moe_layer_us', float('nan')):.1f} us",
        file=sys.stderr,
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> int:
    from scheduler.placement.methods import method_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "placement.json")
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--cases", default="esft,deepseek-v3")
    parser.add_argument("--esft-time-limit", type=float, default=20.0)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    cases = args.cases.split(",")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-placement-") as tmp:
        if "esft" in cases:
            fit, test = _split_esft(args.data, Path(tmp))
            print("ESFT held-out (fit: even sequences, measure: odd)", file=sys.stderr)
            for redundant in (0, 16):
                for method in methods:
                    rec = _run(method, fit, test, 4, 2, redundant, args.esft_time_limit)
                    records.append({"case": "esft-heldout", **rec})
        if "deepseek-v3" in cases:
            ds = _deepseek_profile(args.data, Path(tmp))
            print("DeepSeek-V3 statistics", file=sys.stderr)
            # 32 redundant slots do not divide over 256 GPUs: 32x8 runs without
            for nodes, limit, redundancy in ((4, 5.0, (0, 32)), (32, 60.0, (0,))):
                for redundant in redundancy:
                    for method in methods:
                        rec = _run(method, ds, ds, nodes, 8, redundant, limit)
                        records.append({"case": "deepseek-v3-stats", **rec})
    result = {
        "benchmark": "placement",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.placement " + " ".join(argv or sys.argv[1:]),
        "machine": machine_facts("numpy", "ortools"),
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
