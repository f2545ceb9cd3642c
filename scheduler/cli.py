"""The ``moe-scheduler`` command line. Thin: parses options, calls the library, reports.

Every expected failure is a :class:`~scheduler.errors.MoeSchedulerError`, printed as one
line (``moe-scheduler: error: <file>: <problem>``) with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from scheduler import __version__
from scheduler.errors import MoeSchedulerError
from scheduler.model_shape import PRESETS, ModelShape, resolve_model
from scheduler.progress import ProgressLines

Handler = Callable[[argparse.Namespace], int]


def _model(args: argparse.Namespace) -> ModelShape | None:
    return resolve_model(args.model) if args.model else None


def _add_input_options(p: argparse.ArgumentParser) -> None:
    from scheduler.traces.importers import FORMATS

    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="input format (default: detected from the path)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME|FILE",
        help=f"model shape: a preset ({', '.join(PRESETS)}) or a JSON file with the model "
        "keys (default: the importer's model for the dataset)",
    )


# ----------------------------------------------------------------------------- import


def cmd_import(args: argparse.Namespace) -> int:
    from scheduler.traces.importers import import_traces

    print(f"importing {args.input} -> {args.out}", file=sys.stderr)
    traces = import_traces(
        args.input,
        args.out,
        fmt=args.format,
        model=_model(args),
        keep_token_ids=not args.no_token_ids,
        overwrite=args.force,
        compress=not args.no_compress,
        progress=ProgressLines(),
    )
    print(
        f"wrote {traces.num_requests} {traces.granularity} records "
        f"({', '.join(traces.phases)}; model {traces.model.name}) to {args.out}"
    )
    return 0


# ----------------------------------------------------------------------------- profile


def cmd_profile(args: argparse.Namespace) -> int:
    from scheduler.profile import build_profile, load_profile, save_profile
    from scheduler.traces.importers import open_traces

    if args.check:
        profile = load_profile(args.input)
        print(
            f"{args.input}: valid profile, model {profile.model.name}, "
            f"{len(profile.classes)} classes ({', '.join(profile.classes)})"
        )
        return 0
    if args.out is None:
        raise MoeSchedulerError("profile needs --out FILE.json (or --check to validate a profile)")
    with tempfile.TemporaryDirectory(prefix="moe-scheduler-") as tmp:
        traces = open_traces(
            args.input, Path(tmp), fmt=args.format, model=_model(args), progress=ProgressLines()
        )
        print(f"profiling {traces.num_requests} records from {args.input}", file=sys.stderr)
        profile = build_profile(
            traces, by=args.by, k=args.k, random_state=args.seed, progress=ProgressLines()
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_profile(profile, args.out)
    print(
        f"wrote {args.out}: {len(profile.classes)} classes "
        + ", ".join(f"{n} ({c.weight:.1%})" for n, c in profile.classes.items())
    )
    return 0


# ----------------------------------------------------------------------------- analyze


def cmd_analyze(args: argparse.Namespace) -> int:
    from scheduler.analysis.collect import from_profile, from_traces
    from scheduler.analysis.report import write_report
    from scheduler.profile import load_profile
    from scheduler.traces.importers import looks_like_profile, open_traces

    names = args.name or []
    if names and len(names) != len(args.inputs):
        raise MoeSchedulerError(f"--name given {len(names)} times for {len(args.inputs)} inputs")
    datasets = []
    with tempfile.TemporaryDirectory(prefix="moe-scheduler-") as tmp:
        for i, path in enumerate(args.inputs):
            name = names[i] if names else path.name.removesuffix(".json")
            print(f"analysing {path} as {name!r}", file=sys.stderr)
            if args.format is None and looks_like_profile(path):
                datasets.append(from_profile(name, load_profile(path)))
                continue
            progress = ProgressLines()
            traces = open_traces(
                path, Path(tmp) / str(i), fmt=args.format, model=_model(args), progress=progress
            )
            datasets.append(from_traces(name, traces, random_state=args.seed, progress=progress))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "moe-scheduler " + " ".join(shlex.quote(a) for a in args.argv)
    fig_dir = write_report(datasets, args.out, command)
    print(f"report: {args.out} (figures in {fig_dir}/)")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-scheduler",
        description="Workload-aware expert placement and request scheduling for multi-node "
        "SGLang MoE serving.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "import",
        help="convert routing traces (real datasets, SGLang outputs) into a trace store",
        description="Convert routing traces into a trace store directory (docs/trace-format.md).",
    )
    p.add_argument("input", type=Path, help="file or directory to import")
    p.add_argument("--out", type=Path, required=True, help="trace store directory to create")
    _add_input_options(p)
    p.add_argument(
        "--no-token-ids",
        action="store_true",
        help="keep only per-request expert counts, drop token-level ids",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--no-compress",
        action="store_true",
        help="write shards uncompressed: several times faster to write, larger on disk",
    )
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser(
        "profile",
        help="build a workload profile (per-class expert counts) from traces",
        description="Build the workload profile JSON (docs/profile-format.md) from traces, "
        "or validate one.",
    )
    p.add_argument("input", type=Path, help="traces: a trace store or any importable input")
    p.add_argument("--out", type=Path, help="profile JSON to write")
    p.add_argument(
        "--by",
        choices=["label", "cluster", "all"],
        default="label",
        help="classes from request labels, k-means clusters, or one class (default: label)",
    )
    p.add_argument("--k", type=int, default=None, help="number of clusters for --by cluster")
    p.add_argument("--seed", type=int, default=0, help="random seed for clustering (default 0)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate INPUT as a profile JSON instead of building one",
    )
    _add_input_options(p)
    p.set_defaults(handler=cmd_profile)

    p = sub.add_parser(
        "analyze",
        help="report expert activation statistics (Markdown + PNG figures)",
        description="Analyse traces or profiles: load imbalance, hottest experts, domain "
        "specificity, prefill-decode correlation, co-activation.",
    )
    p.add_argument("inputs", type=Path, nargs="+", help="trace inputs or profile JSON files")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="report Markdown file; figures go to <stem>-figures/ beside it",
    )
    p.add_argument(
        "--name",
        action="append",
        help="display name per input, in order (default: the input's file name)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling and splits")
    _add_input_options(p)
    p.set_defaults(handler=cmd_analyze)

    # Subsystems with their own commands register them here (each module exposes
    # add_commands(subparsers), imported lazily inside its handlers).
    from scheduler.placement.cli import add_commands as add_placement_commands

    add_placement_commands(sub)
    from scheduler.emulator.cli import add_commands as add_emulator_commands

    add_emulator_commands(sub)
    from scheduler.prediction.cli import add_commands as add_prediction_commands

    add_prediction_commands(sub)
    from scheduler.simulation.cli import add_commands as add_simulation_commands

    add_simulation_commands(sub)
    from scheduler.deploy.cli import add_commands as add_deploy_commands

    add_deploy_commands(sub)
    from scheduler.server.cli import add_commands as add_server_commands

    add_server_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return int(args.handler(args))
    except MoeSchedulerError as e:
        print(f"moe-scheduler: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-scheduler: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141
