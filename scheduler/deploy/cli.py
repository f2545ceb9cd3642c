"""``moe-scheduler sglang-args``: the SGLang launch command of every node for a placement.

Reads the topology, the placement directory and (if present) its ``plan.json``, checks
that they agree and that SGLang can serve a placement of the model, and prints what
:mod:`scheduler.deploy.sglang_args` builds (a warning on stderr for a model whose SGLang
class was not checked).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from scheduler.deploy.sglang_args import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_SGLANG_VERSION,
    DISAGGREGATION_MODES,
    SglangLaunch,
)
from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.sglang_versions import DEFAULT_BOOTSTRAP_PORT, SglangVersion


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "sglang-args",
        help="print the SGLang launch command of every node for a placement",
        description="Print, for every node of the topology, the `python3 -m "
        "sglang.launch_server` command that serves the placement DIR (written by "
        "`moe-scheduler place`): multi-node, TP = EP = attention DP over all GPUs, "
        "--init-expert-location DIR/expert_location.json, the matching "
        "--ep-num-redundant-experts, static dispatch, DeepEP, routed experts returned, "
        "routing-key scheduling, --api-key from $SGLANG_API_KEY on node 0; --enable-eplb "
        "stays off (it would overwrite the placement). --disaggregation-mode makes it a "
        "prefill or decode instance. Only flags the given SGLang version "
        "accepts are emitted; a model whose SGLang class ignores expert placements "
        "(Mixtral) is refused.",
    )
    p.add_argument("--topology", type=Path, required=True, help="topology TOML")
    p.add_argument(
        "--placement", type=Path, required=True, metavar="DIR", help="placement directory"
    )
    p.add_argument(
        "--model-path",
        required=True,
        metavar="M",
        help="SGLang --model-path: HF model id or a directory on the nodes",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME|FILE",
        help=f"model shape: a preset ({', '.join(PRESETS)}) or a JSON file (default: the "
        "shape recorded in DIR/plan.json)",
    )
    p.add_argument(
        "--sglang-version",
        default=DEFAULT_SGLANG_VERSION,
        metavar="X.Y.Z",
        help=f"SGLang version on the nodes; picks --attn-dp-size (>= 0.5.22) or "
        f"--enable-dp-attention --dp-size, and adds --enable-return-routed-experts "
        f"(>= 0.5.7) and --schedule-policy routing-key (>= 0.5.8) "
        f"(default {DEFAULT_SGLANG_VERSION}; see docs/sglang-versions.md)",
    )
    p.add_argument(
        "--dist-init-addr",
        default=None,
        metavar="HOST:PORT",
        help="node 0's address for torch.distributed (required for more than one node)",
    )
    p.add_argument("--host", default="0.0.0.0", help="node 0's HTTP bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=30000, help="node 0's HTTP port (default 30000)")
    p.add_argument(
        "--placement-on-nodes",
        default=None,
        metavar="DIR",
        help="the placement directory's path on the SGLang nodes (default: --placement as given)",
    )
    p.add_argument(
        "--extra-args",
        default="",
        metavar="'ARGS'",
        help="more SGLang arguments for every node, one shell-quoted string given with '=' "
        "(e.g. --extra-args='--enable-metrics --mem-fraction-static 0.8'); an "
        "--expert-distribution-recorder-mode other than per_token gets --deepep-mode normal",
    )
    p.add_argument(
        "--disaggregation-mode",
        choices=list(DISAGGREGATION_MODES),
        default=None,
        help="SGLang's --disaggregation-mode on every node: a prefill or a decode instance "
        "of prefill/decode disaggregation (default: neither, a mixed instance)",
    )
    p.add_argument(
        "--disaggregation-bootstrap-port",
        type=int,
        default=None,
        metavar="P",
        help="a prefill instance's bootstrap server port, on node 0 (emitted on every "
        f"node; default SGLang's {DEFAULT_BOOTSTRAP_PORT}); only with "
        "--disaggregation-mode prefill",
    )
    p.add_argument(
        "--disaggregation-transfer-backend",
        default=None,
        metavar="NAME",
        help="SGLang's --disaggregation-transfer-backend (default: not emitted, SGLang's "
        "mooncake); give prefill and decode the same; only with --disaggregation-mode",
    )
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-env",
        default=DEFAULT_API_KEY_ENV,
        metavar="NAME",
        help='node 0 gets --api-key "$NAME" (a reference to the environment variable, '
        f"never the key itself; default {DEFAULT_API_KEY_ENV}): the key the scheduler sends "
        "as MOE_SCHEDULER_BACKEND_API_KEY",
    )
    key.add_argument(
        "--no-api-key",
        action="store_true",
        help="no --api-key: SGLang's HTTP API is then open to whoever reaches node 0",
    )
    p.add_argument(
        "--format",
        choices=["shell", "json"],
        default="shell",
        help="a shell listing with one command per node (default) or JSON",
    )
    p.set_defaults(handler=cmd_sglang_args)


def _plan_cluster(plan: dict[str, Any], plan_path: Path) -> dict[str, Any]:
    cluster = plan.get("cluster")
    if not isinstance(cluster, dict):
        raise InputError(plan_path, "missing the 'cluster' object (nodes, gpus_per_node)")
    return cluster


def load_launch(args: argparse.Namespace) -> SglangLaunch:
    """Read topology, placement and plan; check they agree; build the launch."""
    from scheduler.jsonio import read_json
    from scheduler.placement.io import EXPERT_LOCATION, PLAN, read_sglang_file
    from scheduler.placement.topology import load_topology

    version = SglangVersion.parse(args.sglang_version)
    topology = load_topology(args.topology)
    directory: Path = args.placement
    if not directory.is_dir():
        raise InputError(directory, "is not a placement directory (moe-scheduler place --out)")
    plan_path = directory / PLAN
    plan = read_json(plan_path) if plan_path.exists() else None
    if plan is not None and not isinstance(plan, dict):
        raise InputError(plan_path, "expected a JSON object")

    model: ModelShape | None = None
    if plan is not None and "model" in plan:
        model = ModelShape.from_dict(plan["model"], plan_path)
    if args.model is not None:
        from scheduler.model_shape import resolve_model

        given = resolve_model(args.model)
        if model is not None and given != model:
            raise ConfigError(
                f"--model {args.model} ({given.name}) is not the model {plan_path} was placed "
                f"for ({model.name}); drop --model or re-place"
            )
        model = given
    if model is None:
        raise ConfigError(f"{directory} has no plan.json with the model: give --model NAME|FILE")

    if plan is not None:
        cluster = _plan_cluster(plan, plan_path)
        shape = (cluster.get("nodes"), cluster.get("gpus_per_node"))
        if shape != (topology.nodes, topology.gpus_per_node):
            raise ConfigError(
                f"{plan_path} was placed for {shape[0]} x {shape[1]} GPUs but "
                f"{args.topology} has {topology.nodes} x {topology.gpus_per_node}; use the "
                "topology the placement was made for, or re-place"
            )

    placement = read_sglang_file(
        directory / EXPERT_LOCATION, model, topology.num_gpus, topology.gpus_per_node
    )
    redundant = placement.num_slots - model.num_experts
    if plan is not None:
        recorded = _plan_cluster(plan, plan_path).get("redundant_experts")
        if recorded is not None and recorded != redundant:
            raise InputError(
                plan_path,
                f"records {recorded} redundant experts but {EXPERT_LOCATION} has "
                f"{placement.num_slots} slots for {model.num_experts} experts ({redundant}); "
                "the two files come from different runs",
            )

    on_nodes = args.placement_on_nodes if args.placement_on_nodes is not None else directory
    try:
        extra = tuple(shlex.split(args.extra_args))
    except ValueError as e:
        raise ConfigError(f"--extra-args: {e}") from e
    return SglangLaunch(
        model_path=args.model_path,
        nodes=topology.nodes,
        gpus_per_node=topology.gpus_per_node,
        num_experts=model.num_experts,
        num_slots=placement.num_slots,
        expert_location=str(Path(on_nodes) / EXPERT_LOCATION),
        version=version,
        dist_init_addr=args.dist_init_addr,
        host=args.host,
        port=args.port,
        extra_args=extra,
        api_key_env=None if args.no_api_key else args.api_key_env,
        model_name=model.name,
        disaggregation_mode=args.disaggregation_mode,
        disaggregation_bootstrap_port=args.disaggregation_bootstrap_port,
        disaggregation_transfer_backend=args.disaggregation_transfer_backend,
    )


def cmd_sglang_args(args: argparse.Namespace) -> int:
    from scheduler import __version__
    from scheduler.deploy.sglang_args import render_json, render_shell

    launch = load_launch(args)
    if launch.model_warning is not None:
        print(f"moe-scheduler: warning: {launch.model_warning}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(render_json(launch), indent=2))
        return 0
    command = "moe-scheduler " + " ".join(shlex.quote(a) for a in args.argv)
    instance = "" if launch.disaggregation_mode is None else f" {launch.role} instance"
    header = [
        f"SGLang {launch.version}{instance} launch for {launch.nodes} node(s) x "
        f"{launch.gpus_per_node} GPU(s); run node N's command on node N.",
        f"Generated by moe-scheduler {__version__}: {command}",
    ]
    print(render_shell(launch, header), end="")
    return 0
