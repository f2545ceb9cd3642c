"""``moe-scheduler serve`` (the gRPC front-end, docs/server.md) and ``moe-scheduler
client`` (send one prompt, replay a prompt file, read statistics)."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, InputError


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


def read_prompts(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a JSONL(.gz) file with a ``prompt`` (or ``text``) field."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    rows: list[dict[str, Any]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise InputError(path, f"line {n}: not JSON ({e})") from None
                text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise InputError(path, f"line {n}: no string field 'prompt'")
                rows.append({"id": str(row.get("id", n)), "prompt": text})
                if limit is not None and len(rows) >= limit:
                    break
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({e})") from None
    return rows


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def replay(
    target: Any,
    prompts: list[dict[str, Any]],
    *,
    rate: float,
    max_new_tokens: int | None,
    timeout: float | None,
    progress: bool = True,
) -> dict[str, Any]:
    """Send ``prompts`` at ``rate`` per second (evenly spaced, open loop); summary dict
    plus per-request ``records``. ``target``: HOST:PORT, or a SchedulerClient (TLS)."""
    import grpc

    from scheduler.client import SchedulerClient

    records: list[dict[str, Any]] = []
    done = 0

    client = target if isinstance(target, SchedulerClient) else SchedulerClient(target)
    async with client:
        await client.wait_ready(10)

        async def one(row: dict[str, Any]) -> None:
            nonlocal done
            started = time.perf_counter()
            rec: dict[str, Any] = {"id": row["id"]}
            try:
                reply = await client.generate(
                    row["prompt"],
                    max_new_tokens=max_new_tokens,
                    timeout=timeout,
                    request_id=f"replay-{row['id']}",
                )
                info = reply.info
                rec.update(
                    status="OK",
                    rank=info.dp_rank,
                    node=info.node,
                    instance=info.instance,
                    cls=info.predicted_class,
                    completion_tokens=info.completion_tokens,
                    prompt_tokens=info.prompt_tokens,
                    queue_s=info.queue_seconds,
                    local_fraction=info.local_fraction if info.HasField("local_fraction") else None,
                    inter_node_bytes=(
                        info.inter_node_bytes if info.HasField("inter_node_bytes") else None
                    ),
                )
                if info.HasField("prefill_dp_rank"):
                    rec.update(
                        prefill_instance=info.prefill_instance, prefill_rank=info.prefill_dp_rank
                    )
            except grpc.aio.AioRpcError as e:
                rec.update(status=e.code().name, error=e.details())
            rec["latency_s"] = time.perf_counter() - started
            records.append(rec)
            done += 1

        show_progress = _Progress(len(prompts))
        start = time.perf_counter()
        tasks = []
        last_print = 0.0
        for i, row in enumerate(prompts):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(row)))
            now = time.perf_counter()
            if progress and now - last_print > 0.5:
                last_print = now
                show_progress(done)
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        if progress:
            show_progress(done)
            if sys.stderr.isatty():
                print(file=sys.stderr)
        stats = await client.stats()
    return summarize(records, wall) | {"server_stats": _stats_dict(stats), "records": records}


class _Progress:
    """A bar redrawn in place on a terminal; elsewhere (logs, make) a line per quarter."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.quarter = -1

    def __call__(self, done: int) -> None:
        total = self.total
        if sys.stderr.isatty():
            width = 30
            filled = int(width * done / total) if total else width
            print(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                end="",
                file=sys.stderr,
            )
            return
        quarter = 4 * done // total if total else 4
        if quarter > self.quarter:
            self.quarter = quarter
            print(f"  {done}/{total} done", file=sys.stderr)


def rank_key(record: dict[str, Any]) -> tuple[str, int]:
    """A replay record's (instance, DP rank): DP ranks repeat across instances."""
    return record.get("instance", ""), record["rank"]


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == "OK"]
    lat = [r["latency_s"] for r in ok]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    measured = [r for r in ok if r.get("inter_node_bytes") is not None]
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in measured)
    ranks: dict[tuple[str, int], int] = {}
    for r in ok:
        ranks[rank_key(r)] = ranks.get(rank_key(r), 0) + 1
    counts = list(ranks.values())
    return {
        "requests": len(records),
        "statuses": statuses,
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
        "latency_p50_s": _percentile(lat, 50),
        "latency_p99_s": _percentile(lat, 99),
        "inter_node_bytes_per_token": (
            sum(r["inter_node_bytes"] for r in measured) / tokens if tokens else None
        ),
        "measured_requests": len(measured),
        "local_fraction_mean": (
            sum(r["local_fraction"] for r in measured) / len(measured) if measured else None
        ),
        "rank_requests_max_over_mean": (
            max(counts) / (sum(counts) / len(counts)) if counts else None
        ),
    }


def _stats_dict(stats: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


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
            raise ConfigError(f"{what} {path}: {e}") from None

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
            if args.action == "generate":
                if args.stream:
                    async for chunk in client.generate_stream(
                        args.prompt,
                        max_new_tokens=args.max_new_tokens,
                        class_hint=args.class_hint,
                        timeout=args.timeout,
                    ):
                        if chunk.finished:
                            print(file=sys.stderr)
                            show(chunk.info)
                        else:
                            print(chunk.text, end="", flush=True)
                else:
                    show(
                        await client.generate(
                            args.prompt,
                            max_new_tokens=args.max_new_tokens,
                            class_hint=args.class_hint,
                            timeout=args.timeout,
                        )
                    )
            elif args.action == "chat":
                messages = [("system", args.system)] if args.system else []
                messages.append(("user", args.message))
                kwargs = {
                    "max_new_tokens": args.max_new_tokens,
                    "class_hint": args.class_hint,
                    "timeout": args.timeout,
                }
                if args.stream:
                    async for piece in client.chat_stream(messages, **kwargs):
                        if piece.finished:
                            print(file=sys.stderr)
                            show(piece.info)
                        else:
                            print(piece.content, end="", flush=True)
                else:
                    show(await client.chat(messages, **kwargs))
            elif args.action == "stats":
                stats = await client.stats()
                show(stats)
                print(telemetry_line(stats), file=sys.stderr)
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
