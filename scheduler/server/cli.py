"""``moe-scheduler serve`` (the gRPC front-end, docs/server.md) and ``moe-scheduler
client`` (send one prompt, replay a prompt file, read statistics)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, InputError
from scheduler.replay import read_prompts, replay


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": round(record.created, 6),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("moe_scheduler")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def cmd_serve(args: argparse.Namespace) -> int:
    from scheduler.server.app import RunningServer, run_loop, serve_forever
    from scheduler.server.config import load_config

    _setup_logging(args.log_level, args.log_format)
    config = load_config(args.config)

    def ready(running: RunningServer) -> None:
        c = running.core
        print(f"grpc listening on {running.grpc_address}", flush=True)
        print(f"metrics on {running.metrics_url}", flush=True)
        if running.openai_url:
            print(f"openai listening on {running.openai_url}", flush=True)
        print(
            f"serving placement {c.cluster.version} ({c.cluster.topology.nodes} nodes x "
            f"{c.cluster.topology.gpus_per_node} GPUs, {c.cluster.model.name}) with policy "
            f"{c.config.policy.name}, prediction {c.config.prediction.mode}, backend "
            + ", ".join(f"{i.name} ({i.role}) {i.url}" for i in c.cluster.instances),
            flush=True,
        )

    run_loop(serve_forever(config, ready, grace_s=args.shutdown_grace))
    return 0


# --------------------------------------------------------------------------- client


def telemetry_line(stats: Any) -> str:
    """What the traffic statistics rest on (routed experts are sampled)."""
    ok, accounted = stats.requests_ok, stats.telemetry_accounted
    share = f" ({100 * accounted / ok:.1f} %)" if ok else ""
    return (
        f"traffic statistics rest on {accounted} of {ok} finished requests{share} whose "
        f"routed experts were accounted ({stats.telemetry_sampled} sampled, "
        f"{stats.telemetry_dropped} dropped)"
    )


def _connect(args: argparse.Namespace) -> Any:
    """A SchedulerClient with the TLS files and admin token the arguments name."""
    import os

    from scheduler.client import SchedulerClient
    from scheduler.server.config import ADMIN_TOKEN_ENV

    def read(path: Path | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as e:
            raise ConfigError(f"{what} {path}: {e}") from e

    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    if args.token_file is not None:
        token = (read(args.token_file, "--token-file") or b"").decode("utf-8", "replace").strip()
    return SchedulerClient(
        args.server,
        token=token,
        tls_ca=read(args.tls_ca, "--tls-ca"),
        tls_cert=read(args.tls_cert, "--tls-cert"),
        tls_key=read(args.tls_key, "--tls-key"),
    )


def cmd_client(args: argparse.Namespace) -> int:
    return asyncio.run(_client(args))


async def _client(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    def show(message: Any) -> None:
        print(
            json.dumps(
                MessageToDict(
                    message,
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                ),
                indent=2,
            )
        )

    try:
        if args.action == "replay":
            if not args.rate > 0:
                raise ConfigError("--rate must be > 0")
            prompts = read_prompts(args.prompts, args.limit)
            if not prompts:
                raise InputError(args.prompts, "no prompts")
            result = await replay(
                _connect(args),
                prompts,
                rate=args.rate,
                max_new_tokens=args.max_new_tokens,
                timeout=args.timeout,
            )
            records = result.pop("records")
            if args.out:
                with open(args.out, "w", encoding="utf-8") as f:
                    for rec in records:
                        f.write(json.dumps(rec) + "\n")
            result.pop("server_stats")
            print(json.dumps(result, indent=2))
            return 0 if result["statuses"].get("OK", 0) == len(records) else 1
        async with _connect(args) as client:
            if args.action in ("generate", "chat"):
                kwargs = {
                    "max_new_tokens": args.max_new_tokens,
                    "class_hint": args.class_hint,
                    "timeout": args.timeout,
                }
                if args.action == "generate":
                    prompt: Any = args.prompt
                    one, many, text = client.generate, client.generate_stream, "text"
                else:
                    prompt = [("system", args.system)] if args.system else []
                    prompt.append(("user", args.message))
                    one, many, text = client.chat, client.chat_stream, "content"
                if args.stream:
                    async for chunk in many(prompt, **kwargs):
                        if chunk.finished:
                            print(file=sys.stderr)
                            show(chunk.info)
                        else:
                            print(getattr(chunk, text), end="", flush=True)
                else:
                    show(await one(prompt, **kwargs))
            elif args.action == "stats":
                stats = await client.stats()
                show(stats)
                print(telemetry_line(stats), file=sys.stderr)
                if stats.text_predictor:
                    print(
                        f"text predictor: {stats.text_predictor} ({stats.text_predictor_reason})",
                        file=sys.stderr,
                    )
            elif args.action == "placement":
                show(await client.placement())
            elif args.action == "reload":
                reply = await client.reload()
                show(reply)
                return 0 if reply.ok else 1
            elif args.action == "feedback":
                reply = await client.feedback()
                if not reply.profile_json:
                    print(
                        "no feedback yet (no finished request returned routed experts)",
                        file=sys.stderr,
                    )
                    return 1
                if args.out:
                    Path(args.out).write_text(reply.profile_json, encoding="utf-8")
                    print(f"wrote {args.out} ({reply.requests} requests, {reply.tokens} tokens)")
                else:
                    print(reply.profile_json)
    except grpc.aio.AioRpcError as e:
        print(f"moe-scheduler: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"moe-scheduler: {args.server}: no server answered", file=sys.stderr)
        return 1
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC scheduler front-end (docs/server.md)")
    p.add_argument("--config", type=Path, required=True, help="scheduler.toml")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per log line",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="seconds running requests get to finish on SIGTERM/SIGINT (default 5)",
    )
    p.set_defaults(handler=cmd_serve)

    c = sub.add_parser("client", help="talk to a running scheduler (gRPC)")
    c.add_argument(
        "--server", default="127.0.0.1:50051", help="HOST:PORT (default 127.0.0.1:50051)"
    )
    c.add_argument("--timeout", type=float, default=None, help="per-request deadline, seconds")
    c.add_argument("--tls-ca", type=Path, default=None, help="PEM CA of the server (TLS)")
    c.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate")
    c.add_argument("--tls-key", type=Path, default=None, help="PEM client key")
    c.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="admin bearer token for reload (default: $MOE_SCHEDULER_ADMIN_TOKEN)",
    )
    actions = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = actions.add_parser("generate", help="send one prompt and print the answer")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--class-hint", default="")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    h = actions.add_parser(
        "chat", help="send one chat message (SGLang applies the chat template); print the answer"
    )
    h.add_argument("message", help="the user's message")
    h.add_argument("--system", default="", help="a system message before it")
    h.add_argument("--max-new-tokens", type=int, default=None)
    h.add_argument("--class-hint", default="")
    h.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    r = actions.add_parser("replay", help="send a prompt file at a rate; print a summary")
    r.add_argument("prompts", type=Path, help='JSONL(.gz) rows with "prompt" (and "id")')
    r.add_argument("--rate", type=float, default=50.0, help="requests per second (default 50)")
    r.add_argument("--limit", type=int, default=None, help="first N prompts only")
    r.add_argument("--max-new-tokens", type=int, default=None)
    r.add_argument("--out", type=Path, default=None, help="per-request results (JSONL)")
    actions.add_parser("stats", help="live statistics")
    actions.add_parser("placement", help="the placement and plan being served")
    actions.add_parser("reload", help="re-read the server's configuration file")
    f = actions.add_parser("feedback", help="the workload profile measured from routed experts")
    f.add_argument("--out", type=Path, default=None, help="write the profile JSON here")
    c.set_defaults(handler=cmd_client)

    from scheduler.server.demo import add_commands as add_demo_commands

    add_demo_commands(sub)
