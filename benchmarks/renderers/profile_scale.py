"""RESULTS.md section for the ``profile_scale`` benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _fmt, _machine_line, _table


def render_profile_scale(data: dict[str, Any], source: Path) -> list[str]:
    requests = data.get("requests")
    limit = data.get("memory_limit_mib")
    peaks = [s["peak_rss_mib"] for s in data.get("steps", []) if s.get("peak_rss_mib") is not None]
    top = max(peaks) if peaks else None
    lines = [
        "## Profile building at scale, synthetic requests (`profile_scale`)",
        "",
        f"Profile building for {_fmt(requests)} requests of {data.get('model')} shape "
        f"(MoE layers x experts decode counts), each step in its own process. "
        f"Memory limit: {_fmt(limit)} MiB; highest step peak: {_fmt(top, 0)} MiB; "
        f"within limit: **{_fmt(data.get('within_limit'))}**.",
        "",
    ]
    if data.get("synthetic"):
        lines += [
            f"**Synthetic data.** {data.get('synthetic_note', 'The requests are generated.')} "
            "Real traces of this size are not available; generated counts of the real shape "
            "exercise the same code paths (trace store, shard streaming, aggregation, "
            "clustering) at a size the real data cannot reach.",
            "",
        ]
    rows = []
    for step in data.get("steps", []):
        rows.append(
            [
                f"`{step.get('step')}`" + (" (synthetic)" if data.get("synthetic") else ""),
                str(step.get("status")),
                _fmt(step.get("seconds")),
                _fmt(step.get("peak_rss_mib"), 0),
                _fmt(step.get("requests_per_s"), 0),
            ]
        )
    lines += _table(["step", "status", "seconds", "peak RSS MiB", "requests/s"], rows)
    lines.append("")
    notes = []
    for step in data.get("steps", []):
        name = step.get("step")
        if name == "generate" and step.get("status") == "ok":
            notes.append(
                f"`generate` wrote {_fmt(step.get('shards'))} shards of "
                f"{_fmt(step.get('shard_size'))} requests (TraceWriter default shard size, "
                + (
                    "uncompressed `np.savez` shards, `--no-compress`, as `make bench` runs it "
                    "to fit its 30-minute budget); "
                    if step.get("compressed") is False
                    else "compressed); "
                )
                + f"{_fmt(step.get('draw_seconds'))} s of its time was drawing the random counts."
            )
        elif name == "label" and step.get("status") == "ok":
            notes.append(
                f'`label`: `build_profile(TraceSet(store), by="label")`, '
                f"{_fmt(step.get('classes'))} classes."
            )
        elif name == "cluster" and step.get("status") == "ok":
            notes.append(
                f'`cluster`: `build_profile(TraceSet(store), by="cluster", k={data.get("k")})`'
                f" (k-means fitted on {_fmt(step.get('kmeans_fitted_on'))} sampled requests, "
                "then every request assigned); "
                f"{_fmt(step.get('classes'))} clusters, purity against the generating "
                f"classes {_fmt(step.get('cluster_purity'), 3)}; cluster sizes "
                + ", ".join(_fmt(v) for v in step.get("requests_per_class", {}).values())
                + "."
            )
        if step.get("status") != "ok" and step.get("message"):
            notes.append(f"`{name}` {step.get('status')}: {step['message']}")
    baselines = [s.get("baseline_rss_mib") for s in data.get("steps", [])]
    if any(b is not None for b in baselines):
        low = min(b for b in baselines if b is not None)
        high = max(b for b in baselines if b is not None)
        span = f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"
        notes.append(
            f"Peak RSS is the child process's `ru_maxrss` and includes the interpreter "
            f"and imports ({span} MiB before the step's work); seconds are "
            "the step's own work, without process start-up."
        )
    per_request = (data.get("steps") or [{}])[0].get("store_bytes_per_request")
    lines += [
        f"- Store size on disk: {_fmt(data.get('store_mib'), 0)} MiB"
        + (f" ({per_request / 1024:.1f} KiB per request)." if per_request else ".")
    ]
    lines += [f"- {n}" for n in notes]
    lines += [
        "",
        _machine_line(data.get("machine", {})) + f" Run at {data.get('generated_at', '?')}.",
        "",
        "Reproduce: `make bench` (runs `python -m benchmarks.profile_scale` then "
        "`python -m benchmarks.render`). Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines
