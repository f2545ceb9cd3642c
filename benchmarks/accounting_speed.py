"""Benchmark: speed of the exact locality accounting (scheduler.accounting).

Cases (target: at least 5 million token-layer routing events per second on 2 cores):

* **ESFT real token ids** (DeepSeek-V2-Lite: 26 MoE layers, 64 experts, top-6), every
  recorded token of the ESFT traces, replicated to a few million token-layers; tokens
  spread round-robin by request over 4 nodes x 2 GPUs; SGLang trivial placement with 16
  redundant slots.
* **Generated DeepSeek-V3-shaped ids** (58 MoE layers, 256 experts, top-8 distinct random
  ids, for speed only, not a workload): 4 nodes x 8 GPUs, trivial placement with 32 redundant
  slots.

Each case times the dispatch table (once per placement) and :func:`account` with per-step
traffic (best of ``--repeats``). Failures are recorded as data.

Usage::

    python -m benchmarks.accounting_speed [--data ../shared/data] [--token-layers 4000000]
        [--out benchmarks/results/accounting.json]
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

from benchmarks.machine import machine_facts

BENCH_DIR = Path(__file__).resolve().parent
TARGET_EVENTS_PER_S = 5e6


def _esft_ids(data: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """The ESFT model, token ids [tokens, layers, top_k] and each token's request index."""
    from scheduler.traces.importers import esft

    source = esft.read(data / "traces" / "esft-deepseek-v2-lite", None)
    ids, owner = [], []
    for i, record in enumerate(source.records):
        for phase_ids in record.token_ids.values():
            ids.append(phase_ids)
            owner.append(np.full(phase_ids.shape[0], i, dtype=np.int64))
    if not ids:
        raise RuntimeError("the ESFT traces hold no token ids")
    return source.model, np.concatenate(ids), np.concatenate(owner)


def _replicate(ids: np.ndarray, owner: np.ndarray, token_layers: int) -> tuple[np.ndarray, ...]:
    copies = max(1, -(-token_layers // (ids.shape[0] * ids.shape[1])))
    shift = owner.max() + 1
    owners = np.concatenate([owner + c * shift for c in range(copies)])
    return np.tile(ids, (copies, 1, 1)), owners


def _run_case(
    name: str,
    model: Any,
    nodes: int,
    per_node: int,
    redundant: int,
    ids: np.ndarray,
    requests: np.ndarray,
    repeats: int,
    note: str,
) -> dict[str, Any]:
    from scheduler.accounting import account, static_dispatch_table
    from scheduler.placement.placement import Placement
    from scheduler.placement.topology import Topology

    gpus = nodes * per_node
    placement = Placement.trivial(
        model.num_moe_layers, model.num_experts, model.num_experts + redundant, gpus, per_node
    )
    topology = Topology(nodes, per_node)
    ranks = requests % gpus
    steps = np.arange(ids.shape[0]) // 4096  # 4096-token batches
    start = time.perf_counter()
    table = static_dispatch_table(placement)
    table_s = time.perf_counter() - start
    best = float("inf")
    acc = None
    for _ in range(repeats):
        start = time.perf_counter()
        acc = account(placement, topology, model, ranks, ids, steps, dest_gpu=table)
        best = min(best, time.perf_counter() - start)
    assert acc is not None
    token_layers = ids.shape[0] * ids.shape[1]
    return {
        "case": name,
        "note": note,
        "model": model.name,
        "topology": f"{nodes}x{per_node}",
        "redundant_slots": redundant,
        "tokens": int(ids.shape[0]),
        "token_layers": int(token_layers),
        "top_k": int(ids.shape[2]),
        "dispatch_table_s": table_s,
        "account_s": best,
        "token_layers_per_s": token_layers / best,
        "expert_events_per_s": ids.size / best,
        "meets_target": token_layers / best >= TARGET_EVENTS_PER_S,
        "remote_hits_per_token_layer": acc.remote_hits_per_token_layer,
        "node_copies_per_token_layer": acc.node_copies_per_token_layer,
        "gpu_load_imbalance_mean": acc.gpu_load_imbalance_mean,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--token-layers", type=int, default=4_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "accounting.json")
    args = parser.parse_args(argv)

    from scheduler.model_shape import PRESETS

    records: list[dict[str, Any]] = []
    try:
        model, ids, owner = _esft_ids(args.data)
        ids, owner = _replicate(ids, owner, args.token_layers)
        records.append(
            _run_case(
                "esft-real",
                model,
                4,
                2,
                16,
                ids,
                owner,
                args.repeats,
                "real ESFT token ids, replicated",
            )
        )
    except Exception as e:  # recorded as data, see benchmarks/ conventions
        traceback.print_exc()
        records.append({"case": "esft-real", "error": f"{type(e).__name__}: {e}"})
    try:
        v3 = PRESETS["deepseek-v3"]
        rng = np.random.default_rng(0)
        tokens = -(-args.token_layers // v3.num_moe_layers)
        # distinct experts per token-layer: a random start plus k steps of 1..31 (< 256)
        shape = (tokens, v3.num_moe_layers, v3.top_k)
        ids = rng.integers(0, v3.num_experts, shape[:2])[:, :, None] + np.cumsum(
            rng.integers(1, 32, shape), axis=2
        )
        ids = (ids % v3.num_experts).astype(np.int16)
        requests = np.arange(tokens) // 64  # 64-token requests
        records.append(
            _run_case(
                "deepseek-v3-generated",
                v3,
                4,
                8,
                32,
                ids,
                requests,
                args.repeats,
                "generated random ids, for speed only",
            )
        )
    except Exception as e:
        traceback.print_exc()
        records.append({"case": "deepseek-v3-generated", "error": f"{type(e).__name__}: {e}"})

    result = {
        "benchmark": "accounting",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.accounting_speed " + " ".join(argv or sys.argv[1:]),
        "machine": machine_facts("numpy"),
        "target_token_layers_per_s": TARGET_EVENTS_PER_S,
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
