"""Replaying prompts through a running scheduler (open loop, at a rate) and summarising
what came back: the library behind ``moe-scheduler client replay``, the demo and the
benchmarks (client side: it needs the gRPC client, not the server)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from scheduler.errors import InputError
from scheduler.jsonio import read_json_lines
from scheduler.progress import ProgressBar


def read_prompts(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (plain, ``.gz`` or ``.xz``) with a ``prompt`` (or
    ``text``) field."""
    rows: list[dict[str, Any]] = []
    for n, row in read_json_lines(path):
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise InputError(path, f"line {n}: no string field 'prompt'")
        rows.append({"id": str(row.get("id", n)), "prompt": text})
        if limit is not None and len(rows) >= limit:
            break
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

        show_progress = ProgressBar(len(prompts))
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
