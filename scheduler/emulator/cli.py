"""``moe-scheduler emulate``: run the SGLang-compatible emulator (see docs/emulator.md)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scheduler.errors import ConfigError
from scheduler.model_shape import PRESETS
from scheduler.placement.topology import DEFAULT_GPU, EXPERT_WEIGHTS, GPU_PRESETS
from scheduler.sglang_versions import NEWEST_CHECKED

if TYPE_CHECKING:
    from scheduler.accounting import CostModel

#: The SGLang version emulated by default (the newest one checked).
SGLANG_VERSION = str(NEWEST_CHECKED)
#: Where the real data is looked for when --data is not given.
DATA_ENV = "MOE_SCHEDULER_DATA"
DEFAULT_DATA = Path("..") / "shared" / "data"


def _pairs(values: list[str] | None, option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or []:
        key, sep, item = value.partition("=")
        if not sep or not key or not item:
            raise ConfigError(f"{option} expects KEY=VALUE, got {value!r}")
        pairs.append((key.strip(), item.strip()))
    return pairs


def _data_dir(args: argparse.Namespace) -> Path | None:
    """--data, else $MOE_SCHEDULER_DATA, else ../shared/data if present; None: no data."""
    if args.no_data:
        return None
    if args.data is not None:
        if not args.data.is_dir():
            raise ConfigError(f"--data {args.data}: not a directory")
        return Path(args.data)
    env = os.environ.get(DATA_ENV)
    path = Path(env) if env else DEFAULT_DATA
    return path if path.is_dir() else None


def cost_model(args: argparse.Namespace) -> CostModel:
    """The accounting's CostModel from --gpu, --expert-weights and the bandwidths;
    ConfigError naming the option for a bad value."""
    from scheduler.accounting import CostModel

    for option, value in (
        ("--intra-node-gbps", args.intra_node_gbps),
        ("--inter-node-gbps", args.inter_node_gbps),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{option} must be a finite number > 0, got {value}")
    gpus = {name.lower(): spec for name, spec in GPU_PRESETS.items()}
    gpu = gpus.get(str(args.gpu).lower())
    if gpu is None:
        raise ConfigError(f"--gpu {args.gpu!r} is not one of {', '.join(GPU_PRESETS)}")
    weights = str(args.expert_weights).lower()
    if weights not in EXPERT_WEIGHTS:
        raise ConfigError(
            f"--expert-weights {args.expert_weights!r} is not one of {', '.join(EXPERT_WEIGHTS)}"
        )
    return CostModel(
        intra_node_gbps=args.intra_node_gbps,
        inter_node_gbps=args.inter_node_gbps,
        gpu=gpu,
        expert_weights=weights,
    )


def cmd_emulate(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from scheduler.emulator.core import Emulator, EmulatorConfig
    from scheduler.emulator.expert_location import load_expert_location, trivial_location
    from scheduler.emulator.ranks import MODES
    from scheduler.emulator.server import serve
    from scheduler.emulator.workload import (
        PromptIndex,
        build_workload,
        check_profile_model,
        load_routing_profile,
        read_prompt_corpus,
    )
    from scheduler.model_shape import resolve_model

    model = resolve_model(args.model)
    try:
        config = EmulatorConfig(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            capacity=args.capacity,
            seed=args.seed,
            concentration=args.concentration,
            time_scale=args.time_scale,
            default_max_new_tokens=args.max_new_tokens,
            load_balance=args.load_balance_method,
            incremental_streaming_output=args.incremental_streaming_output,
            api_key=args.api_key,
            sglang_version=args.sglang_version,
            role=args.role,
            bootstrap_port=args.disaggregation_bootstrap_port,
            kv_timeout_s=args.kv_timeout,
            tokenizer_path=args.tokenizer_path,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cost = cost_model(args)
    spec, gpus = args.init_expert_location, config.gpus_per_node
    if spec == "trivial":
        redundant = args.ep_num_redundant_experts or 0
        placement = trivial_location(model, config.num_ranks, gpus, redundant)
    else:
        placement = load_expert_location(spec, model, config.num_ranks, gpus)
        redundant = args.ep_num_redundant_experts
        if redundant is not None and redundant != placement.num_slots - model.num_experts:
            raise ConfigError(
                f"--ep-num-redundant-experts {redundant} does not match the placement, "
                f"which has {placement.num_slots} slots for {model.num_experts} experts"
            )
    rank_modes = []
    for rank_text, mode in _pairs(args.rank_mode, "--rank-mode"):
        if not rank_text.isdigit() or not int(rank_text) < config.num_ranks or mode not in MODES:
            raise ConfigError(
                f"--rank-mode {rank_text}={mode}: need a rank in [0, {config.num_ranks}) and a "
                f"mode in {', '.join(MODES)}"
            )
        rank_modes.append((int(rank_text), mode))

    data = _data_dir(args)
    profile, profile_source = load_routing_profile(args.profile, data)
    check_profile_model(profile, model, profile_source)
    prompts = data / "prompts" if data is not None else None
    has_prompts = prompts is not None and prompts.is_dir()
    index = read_prompt_corpus(prompts) if prompts is not None and has_prompts else PromptIndex()
    class_map = dict(_pairs(args.class_map, "--class-map")) or None
    workload = build_workload(profile, index, default=args.default_class, class_map=class_map)
    shown_spec = "inline JSON" if spec.lstrip().startswith("{") else spec
    emulator = Emulator(
        config,
        model,
        placement,
        workload,
        cost,
        profile_source=profile_source,
        placement_spec=shown_spec,
    )
    for rank, mode in rank_modes:
        emulator.pool.set_mode(rank, mode)

    print(
        f"emulating SGLang {config.sglang_version} ({config.role}, load balance "
        f"{config.load_balance}): {config.nodes} node(s) x {config.gpus_per_node} GPU(s) = "
        f"{config.num_ranks} DP ranks of {model.name}, capacity {config.capacity} per rank, "
        f"placement {shown_spec}; routing drawn from {profile_source} (classes "
        + ", ".join(f"{d}->{c}" for d, c in workload.domain_to_class.items())
        + f", default {workload.default}); prompt index: {len(index)} prompts"
        + ("" if len(index) else " (no corpus: every prompt gets the default class)")
        + (
            "; API key required (Authorization: Bearer) except on /health*, /ready*, /metrics*"
            if config.api_key is not None
            else "; no API key: every endpoint, /admin included, is open to whoever reaches it"
        ),
        file=sys.stderr,
        flush=True,
    )

    def shown(host: str) -> str:
        return f"[{host}]" if ":" in host else host

    def ready(host: str, port: int) -> None:
        print(f"listening on http://{shown(host)}:{port}", flush=True)

    def bootstrap_ready(host: str, port: int) -> None:  # printed before "listening on"
        print(f"bootstrap listening on {shown(host)}:{port}", flush=True)

    def event(message: str) -> None:
        print(f"emulator: {message}", file=sys.stderr, flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            emulator,
            args.host,
            args.port,
            stop,
            on_ready=ready,
            on_bootstrap_ready=bootstrap_ready,
            on_event=event,
            shutdown_grace_s=args.shutdown_grace,
        )

    try:
        asyncio.run(run())
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from e
    print("emulator stopped", file=sys.stderr, flush=True)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``emulate`` on the moe-scheduler subcommand parser."""
    p = subparsers.add_parser(
        "emulate",
        help="run an SGLang-compatible emulator of a multi-node cluster (no GPU)",
        description="Serve SGLang's HTTP API (/generate with routed_dp_rank and "
        "return_routed_experts, /health, /ready, /server_info, /model_info, /v1/models, "
        "/v1/loads) for NODES x GPUS emulated DP-attention ranks, as --sglang-version reads "
        "requests, in a PD --role (prefill: with a bootstrap server), failing as SGLang fails "
        "(POST /admin/instance). Routed experts are DRAWN from real per-class routing profiles "
        "(not measured); latency follows the project's cost model (scheduler.accounting) "
        "over the expected traffic of each request's class on its rank. See docs/emulator.md.",
    )
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= DP ranks) per node")
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME|FILE",
        help=f"model shape: a preset ({', '.join(PRESETS)}) or a JSON file with the model keys",
    )
    p.add_argument(
        "--init-expert-location",
        required=True,
        metavar="trivial|FILE.json",
        help='expert placement: "trivial" or SGLang\'s {"physical_to_logical_map": [[...]]} '
        "JSON (a file, or inline JSON)",
    )
    p.add_argument(
        "--ep-num-redundant-experts",
        type=int,
        default=None,
        help="redundant slots per layer for trivial (default 0); checked against a file",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=30000,
        help="port (default 30000, as SGLang); 0 picks a free one, printed on startup",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="SGLang's --api-key: every endpoint but /health*, /ready* and /metrics* (/admin "
        "included) then needs 'Authorization: Bearer KEY' and answers 401 without it; SGLang "
        'reads no environment variable for it, so pass --api-key "$SGLANG_API_KEY"',
    )
    p.add_argument(
        "--capacity", type=int, default=32, help="running requests per DP rank (default 32)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"real data directory (default ${DATA_ENV}, else ../shared/data if present): "
        "routing profile from its ESFT traces, request classes from its prompt corpus",
    )
    p.add_argument(
        "--no-data",
        action="store_true",
        help="ignore the real data: shipped default profile, every prompt the default class",
    )
    p.add_argument(
        "--profile", type=Path, default=None, help="routing profile JSON to draw from instead"
    )
    p.add_argument(
        "--default-class",
        default="general",
        help="class of prompts not in the corpus: a domain, a profile class, or 'mixture' "
        "(a class drawn by profile weight from a hash of the prompt); default general",
    )
    p.add_argument(
        "--class-map",
        action="append",
        metavar="DOMAIN=CLASS",
        help="map a corpus domain to a profile class (repeatable; default: the ESFT "
        "stand-ins translation=code, law=math, intent=chat, summary=general)",
    )
    p.add_argument(
        "--concentration",
        type=float,
        default=1000.0,
        help="Dirichlet concentration of the per-request routing variation (default 1000; "
        "'inf' for none)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per modelled second (default 1; 0: answer at once)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="completion tokens when sampling_params.max_new_tokens is absent (default 16)",
    )
    p.add_argument(
        "--load-balance-method",
        choices=["auto", "round_robin", "total_requests", "follow_bootstrap_room"],
        default="auto",
        help="rank choice for requests without a pinned rank; auto (default), as SGLang: "
        "follow_bootstrap_room (bootstrap_room %% ranks) on a prefill, round_robin otherwise",
    )
    p.add_argument(
        "--sglang-version",
        default=SGLANG_VERSION,
        metavar="V",
        help=f"SGLang version to emulate (default {SGLANG_VERSION}): /server_info reports it; "
        "before 0.5.20 the rank field is data_parallel_rank and routed_dp_rank is dropped",
    )
    p.add_argument(
        "--role",
        choices=["mixed", "prefill", "decode"],
        default="mixed",
        help="SGLang's --disaggregation-mode: mixed (no PD, default), prefill or decode",
    )
    p.add_argument(
        "--disaggregation-bootstrap-port",
        type=int,
        default=8998,
        metavar="P",
        help="prefill: port of the bootstrap server that pairs PD legs (default 8998, as "
        "SGLang; 0 picks a free one, printed as 'bootstrap listening on HOST:PORT')",
    )
    p.add_argument(
        "--tokenizer-path",
        default=None,
        metavar="PATH",
        help="what /model_info reports as tokenizer_path (default: the model name, as "
        "SGLang defaults it to the model path); clients such as SGLang's bench_serving load "
        "their tokenizer from it",
    )
    p.add_argument(
        "--kv-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="PD: wall seconds a leg waits for its peer (prefill: for the KV to be fetched; "
        "decode: for the prefill to finish) before failing (default 30)",
    )
    p.add_argument(
        "--incremental-streaming-output",
        action="store_true",
        help="stream only the new text and ids in each chunk (SGLang's option; default: "
        "cumulative)",
    )
    p.add_argument(
        "--rank-mode",
        action="append",
        metavar="RANK=MODE",
        help="start rank RANK in MODE (ok, fail or hang); repeatable",
    )
    p.add_argument(
        "--intra-node-gbps", type=float, default=450.0, help="NVLink GB/s per GPU (default 450)"
    )
    p.add_argument(
        "--inter-node-gbps", type=float, default=50.0, help="NIC GB/s per GPU (default 50)"
    )
    p.add_argument(
        "--gpu",
        default=DEFAULT_GPU,
        metavar="|".join(GPU_PRESETS),
        help=f"GPU of the cost model's expert time (HBM bandwidth, peak TFLOPS; default "
        f"{DEFAULT_GPU})",
    )
    p.add_argument(
        "--expert-weights",
        default="fp8",
        metavar="|".join(EXPERT_WEIGHTS),
        help="expert weight format: bytes read per weight and which peak applies (default fp8)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds running requests get to finish on SIGTERM/SIGINT (default 5)",
    )
    p.set_defaults(handler=cmd_emulate)
