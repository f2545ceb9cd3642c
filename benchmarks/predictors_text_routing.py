"""Benchmark: text -> routing predictors on (prompt, routed experts) pairs.

A separate step of the predictors benchmark (it runs alone, in a few minutes, and writes
its own result file ``results/predictors_text_routing.json``):

1. ``real_pairs``: the real Mixtral sample's (prompt, routed experts) pairs, through the
   same code as ``moe-scheduler fit`` (``fit_text_cluster``): n = 5, so it says
   "skipped" and why, or reports figures on what there is.
2. ``emulated_pairs`` -- PROXY, NOT MEASURED ROUTING: real prompts of the domain
   classifier's held-out split, each given routing DRAWN by the emulator
   (:mod:`scheduler.emulator.routing`) from the real ESFT per-class profile of its true
   domain's stand-in (:data:`scheduler.class_map.ESFT_STAND_INS`). The prompts' text is
   real; the routing is a draw, so the clusters coincide with the domains by
   construction and the figures say how fast the text side learns them, not how real
   routing relates to text. Held-out cluster accuracy, histogram Pearson and the
   locality proxy of the learned predictor, the class map and one cluster, and the
   learning curve over training pairs (several seeds).
3. ``buffer_row``: the size of the feedback buffer's measured-routing encoding
   (:mod:`scheduler.prediction.pair_buffer`) for the emulated DeepSeek-V2-Lite pairs and
   for a DeepSeek-V3-shape request (58 x 256, top-8; routing drawn from a Dirichlet,
   synthetic), and the serving cost of one learned prediction.

Usage::

    python -m benchmarks.predictors_text_routing [--data ../shared/data] [--pairs 2000]
        [--seeds 3] && python -m benchmarks.render
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

import numpy as np

from benchmarks import harness
from benchmarks.machine import machine_facts
from scheduler.prediction.training import FitConfig

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

NODES = 4
DECODE_TOKENS = 64
PROXY = (
    "PROXY: real held-out prompts; routing DRAWN by the emulator from the real ESFT "
    "per-class profile of each prompt's true domain (not measured routing)"
)


def step_real_pairs(data: Path, domain: Any) -> dict[str, Any]:
    from scheduler.prediction.datasets import load_routing
    from scheduler.prediction.training import (
        fit_clusters,
        fit_text_cluster,
        phase_pairs,
        request_split,
    )
    from scheduler.traces.importers import open_traces

    with tempfile.TemporaryDirectory() as tmp:
        traces = open_traces(data / "traces" / "mixtral-humaneval-gsm8k-small", Path(tmp))
        routing = load_routing(traces)
        model = traces.model
    config = FitConfig(data_dir=data, nodes=2)
    pairs = phase_pairs(routing, model.num_experts, 0.5)
    train, test = request_split(list(routing.labels), config)
    clusters, _ = fit_clusters(pairs, None, train, test, config)
    _, report = fit_text_cluster(
        routing, pairs, clusters, domain, train, test, nodes=2, top_k=model.top_k
    )
    with_prompts = sum(1 for p in routing.prompts if p)
    return {"model": model.name, "pairs": len(routing), "with_prompts": with_prompts, **report}


def _emulated(data: Path, n_pairs: int, seed: int, split: tuple[Any, Any]) -> dict[str, Any]:
    """Real held-out prompts with drawn routing (module docstring, step 2)."""
    from scheduler.class_map import ESFT_STAND_INS
    from scheduler.emulator.routing import (
        DEFAULT_CONCENTRATION,
        class_routing,
        draw_request_routing,
        sample_token_experts,
    )
    from scheduler.emulator.workload import load_routing_profile

    profile, where = load_routing_profile(None, data)
    model = profile.model
    prompts, test_rows = split
    stand_in = {d: esft for esft, d in ESFT_STAND_INS.items()}
    rng = np.random.default_rng(seed)
    usable = [r for r in test_rows if stand_in.get(str(prompts.domains[r])) in profile.classes]
    rows = np.sort(rng.choice(usable, min(n_pairs, len(usable)), replace=False))
    shares = {c: class_routing(p) for c, p in profile.classes.items()}
    counts = np.zeros((len(rows), model.num_moe_layers, model.num_experts))
    layer_idx = np.arange(model.num_moe_layers)[None, :, None]
    for i, r in enumerate(rows):
        cls = stand_in[str(prompts.domains[r])]
        pi = draw_request_routing(shares[cls], model.top_k, DEFAULT_CONCENTRATION, rng).decode
        ids = sample_token_experts(pi, DECODE_TOKENS, model.top_k, rng)
        np.add.at(counts[i], (np.broadcast_to(layer_idx, ids.shape), ids), 1)
    return {
        "model": model,
        "profile": where,
        "texts": prompts.texts[rows],
        "domains": prompts.domains[rows],
        "counts": counts,
    }


def step_emulated(seeds: int, domain: Any, em: dict[str, Any]) -> dict[str, Any]:
    from scheduler.prediction.cluster_selection import make_clusters
    from scheduler.prediction.text_routing import (
        TextHistogramPredictor,
        choose_text_predictor,
        score_with_curve,
        summarise_curve,
    )

    model = em["model"]
    texts, counts = em["texts"], em["counts"]
    n = len(texts)
    order = np.random.default_rng(0).permutation(n)
    cut = int(round(n * 0.7))
    tr, te = np.sort(order[:cut]), np.sort(order[cut:])
    per_node = model.num_experts // NODES
    clusters = make_clusters("share", "all", NODES, model.num_moe_layers, per_node, 0)
    clusters.fit(counts[tr])
    learned, held, runs = score_with_curve(
        clusters,
        domain,
        texts[tr],
        counts[tr],
        texts[te],
        counts[te],
        nodes=NODES,
        top_k=model.top_k,
        seeds=seeds,
    )
    latency: dict[str, Any] = {}
    if learned is not None:
        hist = TextHistogramPredictor(learned)
        hist.predict_one(str(texts[te][0]))
        times = []
        for t in texts[te]:
            start = time.perf_counter()
            hist.predict_one(str(t)[:4096])
            times.append(time.perf_counter() - start)
        ms = np.asarray(times) * 1e3
        latency = {
            "requests": len(ms),
            "mean_ms": float(ms.mean()),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
    from sklearn.metrics import adjusted_rand_score

    return {
        "proxy": PROXY,
        "model": model.name,
        "routing_profile": em["profile"],
        "decode_tokens_per_pair": DECODE_TOKENS,
        "nodes": NODES,
        "clusters": f"paper B features, K = {NODES}, fitted on the training pairs",
        "clusters_vs_domains_ari": float(
            adjusted_rand_score(em["domains"][te], clusters.predict(counts[te]))
        ),
        "pairs": n,
        "train_pairs": len(tr),
        "test_pairs": len(te),
        "held_out": held,
        "text_predictor": choose_text_predictor(held),
        "learning_curve": summarise_curve(runs),
        "learning_curve_seeds": seeds,
        "serving_latency": latency,
    }


def step_buffer_row(em: dict[str, Any]) -> dict[str, Any]:
    from scheduler.model_shape import PRESETS
    from scheduler.prediction.pair_buffer import encode_routing, row_bytes

    sizes = [
        row_bytes({"prompt": "", "class": "c", "routing": encode_routing(c, "decode")})
        for c in em["counts"][:200]
    ]
    v3 = PRESETS["deepseek-v3"]
    rng = np.random.default_rng(0)
    out_v3 = {}
    for tokens in (64, 512):
        counts = np.zeros((v3.num_moe_layers, v3.num_experts))
        for layer in range(v3.num_moe_layers):
            p = rng.dirichlet(np.full(v3.num_experts, 0.3))
            ids = np.array(
                [rng.choice(v3.num_experts, 8, replace=False, p=p) for _ in range(tokens)]
            )
            np.add.at(counts[layer], ids.ravel(), 1)
        out_v3[str(tokens)] = row_bytes(
            {"prompt": "", "class": "c", "routing": encode_routing(counts, "decode")}
        )
    return {
        "note": "bytes of one buffer line without its prompt text",
        "deepseek_v2_lite_emulated": {
            "tokens": DECODE_TOKENS,
            "mean_bytes": float(np.mean(sizes)),
            "max_bytes": int(np.max(sizes)),
        },
        "deepseek_v3_synthetic_bytes_by_tokens": out_v3,
        "deepseek_v3_10k_rows_mib_at_512_tokens": out_v3["512"] * 10_000 / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results" / "predictors_text_routing.json"
    )
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-prompts", type=int, default=8000)
    args = parser.parse_args(argv)
    data = args.data.resolve()
    result: dict[str, Any] = {
        "benchmark": "predictors_text_routing",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(args.data),
        "machine": machine_facts(),
        "command": f"python -m benchmarks.predictors_text_routing --pairs {args.pairs} "
        f"--seeds {args.seeds} --max-prompts {args.max_prompts} && python -m benchmarks.render",
    }
    steps = result["steps"] = {}
    from scheduler.prediction.text_classifier import TextClassifier
    from scheduler.prediction.training import domain_split

    start = time.perf_counter()
    prompts, train_rows, test_rows = domain_split(FitConfig(data_dir=data))
    rng = np.random.default_rng(0)
    fit_rows = rng.choice(train_rows, min(args.max_prompts, len(train_rows)), replace=False)
    domain = TextClassifier().fit(prompts.texts[fit_rows], prompts.domains[fit_rows])
    result["domain_classifier"] = {
        "train_prompts": len(fit_rows),
        "seconds": time.perf_counter() - start,
        "note": f"fitted on {len(fit_rows)} prompts sampled from the training split; the "
        "emulated pairs' prompts are from the held-out split (grouped by text: disjoint)",
    }
    split = (prompts, test_rows)
    steps["real_pairs"] = harness.run_step("real_pairs", lambda: step_real_pairs(data, domain))
    em: dict[str, Any] = {}

    def emulated() -> dict[str, Any]:
        em.update(_emulated(data, args.pairs, 0, split))
        return step_emulated(args.seeds, domain, em)

    steps["emulated_pairs"] = harness.run_step("emulated_pairs", emulated)
    if em:
        steps["buffer_row"] = harness.run_step("buffer_row", lambda: step_buffer_row(em))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    harness.eprint(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
