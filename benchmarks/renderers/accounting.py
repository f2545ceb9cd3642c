"""RESULTS.md section for the ``accounting`` benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table


def render_accounting(data: dict[str, Any], source: Path) -> list[str]:
    target = data.get("target_token_layers_per_s")
    lines = [
        "## Locality accounting speed (`accounting`)",
        "",
        "Exact per-token accounting (`scheduler.accounting.account`: static dispatch, remote "
        "hits, node and intra-node copies, per-rank per-step bytes, GPU loads) over every "
        f"token-layer; target {_fmt(target, 0)} token-layers/s. "
        + _machine_line(data.get("machine", {})),
        "",
    ]
    rows = []
    for rec in data.get("records", []):
        if "error" in rec:
            rows.append([str(rec.get("case")), "failed: " + str(rec["error"])] + ["-"] * 6)
            continue
        rows.append(
            [
                f"{rec['case']} ({rec.get('note', '')})",
                f"{rec.get('model')}, {rec.get('topology')}, +{rec.get('redundant_slots')} slots",
                _fmt(rec.get("token_layers")),
                _fmt(rec.get("top_k")),
                _fmt(1e3 * rec["dispatch_table_s"], 1) + " ms",
                _fmt(rec.get("account_s"), 3) + " s",
                _fmt(rec["token_layers_per_s"] / 1e6, 1) + " M",
                _fmt(rec.get("meets_target")),
            ]
        )
    header = [
        "case",
        "shape",
        "token-layers",
        "top-k",
        "dispatch table",
        "account",
        "token-layers/s",
        "meets target",
    ]
    lines += _table(header, rows)
    lines += [
        "",
        f"Command: `{_command(data, 'python -m benchmarks.accounting_speed')}` (also run "
        "by `make bench`); raw numbers: [`results/accounting.json`](results/accounting.json). "
        f"Run at {data.get('generated_at')}.",
        "",
    ]
    return lines
