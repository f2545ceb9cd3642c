"""Regenerate ``data/default_profile.json``, the emulator's fallback routing profile.

It is our own ``moe-scheduler profile`` run on the real ESFT traces (per-label aggregate
counts, about 30 KB), with its provenance written into the file's ``source``::

    python -m scheduler.emulator.default_profile [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from scheduler.class_map import ESFT_STAND_INS
from scheduler.emulator.workload import DEFAULT_PROFILE, ESFT_TRACES

DATASET = (
    "ESFT expert-routing traces: deepseek-ai/ESFT results/expert_scores at commit "
    "579a7711e4b332b4c57b47e378a0cf240d85caa6 (ESFT-vanilla-lite, DeepSeek-V2-Lite "
    "architecture; 4 domains, 213 sequences, 33,279 tokens), as packaged in "
    "shared/data/traces/esft-deepseek-v2-lite"
)


def main(argv: list[str] | None = None) -> int:
    from scheduler.cli import main as cli_main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("..") / "shared" / "data")
    parser.add_argument("--out", type=Path, default=DEFAULT_PROFILE)
    args = parser.parse_args(argv)
    traces = args.data / ESFT_TRACES
    command = ["profile", str(traces), "--by", "label"]
    with tempfile.TemporaryDirectory(prefix="moe-scheduler-") as tmp:
        out = Path(tmp) / "profile.json"
        status = cli_main([*command, "--out", str(out)])
        if status:
            return status
        profile = json.loads(out.read_text(encoding="utf-8"))
    source = profile.get("source", {})
    source.pop("traces", None)  # a temporary directory
    profile["source"] = {
        "provenance": {
            "command": "moe-scheduler " + " ".join(command) + f" --out {args.out.name}",
            "regenerate": "python -m scheduler.emulator.default_profile --data DATA",
            "dataset": DATASET,
            "generated_on": datetime.now(UTC).date().isoformat(),
            "what": "aggregate per-class routed-token counts [26 MoE layers x 64 experts]; "
            "real routing of teacher-forced prompt+answer passes, recorded as prefill",
            "emulator_stand_ins": {esft: domain for esft, domain in ESFT_STAND_INS.items()},
        },
        **source,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
