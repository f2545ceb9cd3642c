"""RESULTS.md section for the ``placement`` benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _table


def render_placement(data: dict[str, Any], source: Path) -> list[str]:
    records = data.get("records", [])
    lines = [
        "## Placement methods side by side (`placement`)",
        "",
        "Every method on the same input in the same run. Metrics are expected values under "
        "SGLang's static dispatch (`scheduler/placement/metrics.py`): remote (token, expert) "
        "hits per token-layer, the busiest rank's inter-node bytes (one copy per remote "
        "expert; relative to `trivial` with no redundancy), mean GPU balancedness "
        "(mean/max load; 1 is perfect) and its worst layer's max/mean, node request-load "
        "max/mean. `vs SGLang` is the remote-hit reduction against SGLang's default "
        "(`trivial`, no redundant experts, round-robin ranks). `modelled us`: the expected "
        "modelled MoE-layer time per layer at decode with 128 running requests per rank "
        "(dispatch and combine padded to the busiest rank, experts at the busiest GPU; "
        "`scheduler/placement/step_time.py`, what `--objective time` minimises), on the "
        "measured (held-out) counts; the replayed times are in the production grid above. "
        "`gap to bound`: to each method's own bound (ours: the joint bound, "
        "docs/placement.md).",
        "",
        "- **esft-heldout**: fitted on the even sequences of each ESFT domain, measured on the "
        "odd ones; requests go where each method's class-to-node shares send them, using the "
        "sequence's real domain (oracle classes).",
        "- **deepseek-v3-stats**: SGLang's published DeepSeek-V3 per-workload statistics "
        "(8 workload classes; aggregates, so fitted and measured on the same counts).",
        "",
    ]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        key = (r.get("case"), r.get("nodes"), r.get("gpus_per_node"))
        groups.setdefault(key, []).append(r)
    for (case, nodes, gpus), group in groups.items():
        base = next(
            (
                r
                for r in group
                if r.get("method") == "trivial"
                and r.get("redundant_experts") == 0
                and r.get("status") != "error"
            ),
            None,
        )
        base_hits = (base or {}).get("metrics", {}).get("remote_hits_per_token_layer")
        base_bytes = (base or {}).get("metrics", {}).get("busiest_rank_inter_node_bytes")
        lines += [f"### {case}, {nodes} x {gpus} GPUs", ""]
        rows = []
        for r in group:
            m = r.get("metrics", {})
            hits = m.get("remote_hits_per_token_layer")
            busiest = m.get("busiest_rank_inter_node_bytes")
            rows.append(
                [
                    f"`{r.get('method')}`",
                    _fmt(r.get("redundant_experts")),
                    str(r.get("status")) + (f": {r['message']}" if r.get("message") else ""),
                    _fmt(r.get("seconds"), 1),
                    _fmt(hits, 3),
                    f"{(1 - hits / base_hits) * 100:.1f}%"
                    if hits is not None and base_hits
                    else "-",
                    _fmt(busiest / base_bytes, 3) if busiest is not None and base_bytes else "-",
                    _fmt(m.get("balancedness_mean"), 3),
                    _fmt(m.get("gpu_expert_load_imbalance_worst"), 3),
                    _fmt(m.get("node_request_load_imbalance"), 3),
                    _fmt(m.get("modelled_moe_layer_us"), 1),
                    f"{r['gap'] * 100:.2f}%" if r.get("gap") is not None else "-",
                ]
            )
        lines += _table(
            [
                "method",
                "redundant",
                "status",
                "seconds",
                "remote hits / token-layer",
                "vs SGLang",
                "busiest rank bytes (rel.)",
                "balancedness",
                "worst layer max/mean",
                "node requests max/mean",
                "modelled us",
                "gap to bound",
            ],
            rows,
        )
        lines.append("")
    lines += [
        f"Command: `{_command(data, 'python -m benchmarks.placement')}` (also run by "
        "`make bench`); raw numbers: [`results/placement.json`](results/placement.json). "
        f"Run at {data.get('generated_at')}.",
        "",
    ]
    return lines
