"""Benchmark: profile building for many SYNTHETIC requests of DeepSeek-V3 shape.

Measures wall time and peak memory (RSS) of three steps, each in its own child process
so that every step's peak is its own:

1. ``generate``: write a trace store (``TraceWriter``, default shard size) of N generated
   requests with decode counts [58 MoE layers, 256 experts];
2. ``label``: ``build_profile(TraceSet(store), by="label")``;
3. ``cluster``: ``build_profile(TraceSet(store), by="cluster", k=K)`` (k-means is fitted
   on a sample bounded by ``MAX_CLUSTER_SAMPLE_BYTES``, then every request is assigned).

The requests are GENERATED: random counts drawn from four Dirichlet-skewed synthetic
class distributions. They exist only to measure how profile building scales; they are
not routing results and say nothing about real expert popularity.

Usage::

    python -m benchmarks.profile_scale [--requests 100000] [--workdir benchmarks/work]
        [--out benchmarks/results/profile_scale.json] [--k 8] [--keep] [--no-compress]

``--no-compress`` writes the store's shards with ``np.savez`` instead of
``np.savez_compressed`` (``TraceWriter(compress=False)``): a larger store, written much
faster; ``make bench`` uses it to stay within its 30-minute budget.

Failures are recorded in the JSON (status "error" and a message), not raised.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_facts

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
MODEL = "deepseek-v3"
MEMORY_LIMIT_MIB = 8192
NUM_CLASSES = 4
STORE_NAME = "profile-scale-store"
STEPS = ("generate", "label", "cluster")
SYNTHETIC_NOTE = (
    "GENERATED requests (random decode counts drawn from 4 Dirichlet-skewed synthetic class "
    "distributions, 150-300 decode tokens each) used only to measure the time and memory of "
    "profile building at scale; they are not routing results and say nothing about real "
    "expert popularity."
)


def _eprint(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1024


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- child steps


def _step_generate(store: Path, requests: int, seed: int, compress: bool = True) -> dict[str, Any]:
    import numpy as np

    from scheduler.model_shape import PRESETS
    from scheduler.traces.store import RequestTrace, TraceWriter

    model = PRESETS[MODEL]
    layers, experts, top_k = model.num_moe_layers, model.num_experts, model.top_k
    shard_size = int(inspect.signature(TraceWriter).parameters["shard_size"].default)
    rng = np.random.default_rng(seed)
    # Per class and MoE layer, a skewed expert popularity: Dirichlet with a small alpha.
    popularity = rng.dirichlet(np.full(experts, 0.3), size=(NUM_CLASSES, layers))
    source = {
        "importer": "benchmarks/profile_scale.py",
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "seed": seed,
    }
    draw_s = 0.0
    report_every = max(1, requests // 10)
    next_report = report_every
    start = time.perf_counter()
    with TraceWriter(store, model, source=source, overwrite=True, compress=compress) as writer:
        for first in range(0, requests, shard_size):
            n = min(shard_size, requests - first)
            t0 = time.perf_counter()
            classes = rng.integers(0, NUM_CLASSES, size=n)
            tokens = rng.integers(150, 301, size=n)
            lam = popularity[classes] * (tokens * top_k)[:, None, None]
            counts = rng.poisson(lam).astype(np.uint16)
            del lam
            draw_s += time.perf_counter() - t0
            for i in range(n):
                writer.add(
                    RequestTrace(
                        request_id=f"synthetic-{first + i:07d}",
                        counts={"decode": counts[i]},
                        tokens={"decode": int(tokens[i])},
                        label=f"class-{classes[i]}",
                    )
                )
            done = first + n
            if done >= next_report or done == requests:
                _eprint(
                    f"[generate] {done}/{requests} requests ({100 * done / requests:.0f}%), "
                    f"{time.perf_counter() - start:.1f} s"
                )
                next_report = (done // report_every + 1) * report_every
    size = _dir_bytes(store)
    manifest = json.loads((store / "manifest.json").read_text())
    return {
        "store_mib": size / 2**20,
        "store_bytes_per_request": size / requests,
        "shards": len(manifest["shards"]),
        "shard_size": shard_size,
        "draw_seconds": draw_s,
        "compressed": compress,
        "note": "seconds include drawing the synthetic counts (draw_seconds) and TraceWriter",
    }


def _profile_progress(total_shards: int) -> Callable[[str], None]:
    """A build_profile progress callback that prints about every 10% of each pass."""
    every = max(1, total_shards // 10)
    seen: dict[str, int] = {}

    def progress(message: str) -> None:
        kind = message.split(":", 1)[0]
        seen[kind] = seen.get(kind, 0) + 1
        if seen[kind] % every == 0 or seen[kind] == total_shards:
            _eprint(f"  [{kind}] {message}")

    return progress


def _step_profile(store: Path, by: str, k: int) -> dict[str, Any]:
    from scheduler.profile import MAX_CLUSTER_SAMPLE_BYTES, build_profile
    from scheduler.traces.store import TraceSet

    traces = TraceSet(store)
    profile = build_profile(
        traces,
        by=by,
        k=k if by == "cluster" else None,
        progress=_profile_progress(len(traces.shards)),
    )
    requests = {name: c.requests for name, c in profile.classes.items()}
    details: dict[str, Any] = {
        "classes": len(profile.classes),
        "requests_per_class": requests,
        "requests_accounted": sum(requests.values()) == traces.num_requests,
    }
    if by == "cluster":
        dim = traces.model.num_moe_layers * traces.model.num_experts
        details["kmeans_fitted_on"] = min(
            traces.num_requests, max(k, MAX_CLUSTER_SAMPLE_BYTES // (dim * 4))
        )
        # Share of requests whose cluster's majority synthetic class is their own class.
        majority = sum(max(c.label_mix.values(), default=0) for c in profile.classes.values())
        details["cluster_purity"] = majority / traces.num_requests
    return details


def run_child(
    step: str, store: Path, requests: int, k: int, seed: int, compress: bool = True
) -> int:
    """Run one step in this process; print one JSON line on stdout."""
    # Import what the steps use first, so that the baseline is interpreter plus imports.
    import numpy  # noqa: F401
    import sklearn.cluster  # noqa: F401

    import scheduler.profile  # noqa: F401
    import scheduler.traces.store  # noqa: F401

    baseline = _peak_rss_mib()
    result: dict[str, Any] = {"step": step}
    start = time.perf_counter()
    try:
        if step == "generate":
            details = _step_generate(store, requests, seed, compress)
        else:
            details = _step_profile(store, step, k)
        seconds = time.perf_counter() - start
        result.update(status="ok", seconds=seconds, requests_per_s=requests / seconds)
        result.update(details)
    except Exception as e:  # recorded as data, not raised
        traceback.print_exc()
        result.update(
            status="error",
            seconds=time.perf_counter() - start,
            message=f"{type(e).__name__}: {e}",
        )
    result["baseline_rss_mib"] = baseline
    result["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- parent


def _machine() -> dict[str, Any]:
    facts = machine_facts("numpy", "scikit-learn")
    threads = {
        v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if v in os.environ
    }
    if threads:
        facts["thread_env"] = threads
    return facts


def _run_step(
    step: str, store: Path, requests: int, k: int, seed: int, timeout: float, compress: bool = True
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.profile_scale",  # this module, run from the repository root
        "--step",
        step,
        "--store",
        str(store.resolve()),
        "--requests",
        str(requests),
        "--k",
        str(k),
        "--seed",
        str(seed),
        *([] if compress else ["--no-compress"]),
    ]
    before = _peak_rss_mib(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _eprint(f"== step {step}")
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {
            "step": step,
            "status": "error",
            "seconds": time.perf_counter() - start,
            "message": f"timed out after {timeout:.0f} s (child killed)",
        }
    process_seconds = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        # The child died without reporting (e.g. killed by the OOM killer). RUSAGE_CHILDREN
        # is the maximum over finished children; if it grew, the growth is this child's.
        after = _peak_rss_mib(resource.RUSAGE_CHILDREN)
        result = {
            "step": step,
            "status": "error",
            "seconds": process_seconds,
            "message": f"child exited with status {proc.returncode} without a result",
            "peak_rss_mib": after if after > before else None,
        }
    if proc.returncode != 0 and result.get("status") == "ok":
        result.update(status="error", message=f"child exited with status {proc.returncode}")
    result["process_seconds"] = process_seconds
    _eprint(
        f"== step {step}: {result['status']}, {result.get('seconds', 0):.1f} s, "
        f"peak RSS {result.get('peak_rss_mib') or 0:.0f} MiB"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / "work")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "profile_scale.json")
    parser.add_argument("--k", type=int, default=8, help="clusters for the cluster step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds allowed per step before it is killed and recorded",
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated store")
    parser.add_argument(
        "--no-compress", action="store_true", help="write uncompressed shards (faster, larger)"
    )
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")

    if args.step:
        return run_child(
            args.step, args.store, args.requests, args.k, args.seed, not args.no_compress
        )

    store = args.workdir.resolve() / STORE_NAME
    store.parent.mkdir(parents=True, exist_ok=True)
    steps: list[dict[str, Any]] = []
    for step in STEPS:
        if steps and steps[0]["status"] != "ok":
            steps.append(
                {"step": step, "status": "skipped", "message": "not run: the generate step failed"}
            )
            continue
        steps.append(
            _run_step(
                step, store, args.requests, args.k, args.seed, args.timeout, not args.no_compress
            )
        )

    generate = steps[0]
    peaks = [s.get("peak_rss_mib") for s in steps]
    within = all(s["status"] == "ok" for s in steps) and all(
        p is not None and p <= MEMORY_LIMIT_MIB for p in peaks
    )
    result = {
        "benchmark": "profile_scale",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "synthetic": True,
        "synthetic_note": SYNTHETIC_NOTE,
        "requests": args.requests,
        "model": MODEL,
        "k": args.k,
        "seed": args.seed,
        "store_mib": generate.get("store_mib"),
        "compressed": not args.no_compress,
        "steps": steps,
        "machine": _machine(),
        "memory_limit_mib": MEMORY_LIMIT_MIB,
        "within_limit": within,
        "command": "make bench  (or: python -m benchmarks.profile_scale "
        f"--requests {args.requests} --k {args.k}"
        + (" --no-compress" if args.no_compress else "")
        + ")",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _eprint(f"wrote {args.out} (within {MEMORY_LIMIT_MIB} MiB: {within})")

    if not args.keep:
        shutil.rmtree(store, ignore_errors=True)
        for leftover in store.parent.glob(f".{STORE_NAME}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        with contextlib.suppress(OSError):
            store.parent.rmdir()  # only if empty
    return 0


if __name__ == "__main__":
    sys.exit(main())
