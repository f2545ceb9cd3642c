"""``moe-scheduler demo``: the whole serving path on this machine. Starts the SGLang
emulator with a placement, then the scheduler once per setting — SGLang's default
``round_robin`` without prediction, and our ``locality_window`` with the text classifier
at each ``--balance`` (default 0 and 0.5: the mean-locality end of the knob and the
default; docs/policies.md) — replays the same held-out real prompts through the gRPC
client under each, and prints a side-by-side table. Then (unless ``--no-pd``) the same
prompts through a prefill/decode disaggregated pair: a prefill emulator and a decode
emulator behind one scheduler, with a table of both legs.

Every process it starts is stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import tomli_w

from scheduler.errors import ConfigError
from scheduler.jsonio import write_json_atomic
from scheduler.processes import Child, spawn
from scheduler.replay import rank_key, replay

#: The locality_window settings of ``[policy] balance`` the demo compares.
DEMO_BALANCES = (0.0, 0.5)
GRPC_READY = r"grpc listening on (\S+)"
#: Prompts the last mixed run also sends as chats through the OpenAI listener.
OPENAI_CHATS = 3
#: The disaggregated run's name in the report.
PD_NAME = "locality_window+text, prefill/decode"


def _command() -> list[str]:
    return [sys.executable, "-m", "scheduler"]


def _write_config(path: Path, sections: dict[str, Any]) -> Path:
    path.write_text("# written by moe-scheduler demo\n" + tomli_w.dumps(sections))
    return path


def _server_sections() -> dict[str, Any]:
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "openai_listen": "127.0.0.1:0",
        },
        # the demo measures every request, not a sample
        "backend": {"return_routed_experts": True, "routed_experts_budget_cores": 0},
    }


def _config(
    path: Path,
    backend: str,
    placement: Path,
    policy: str,
    mode: str,
    bundle: Path,
    profile: Path,
    capacity: int,
    balance: float | None = None,
) -> Path:
    sections = _server_sections()
    sections["backend"]["url"] = backend
    sections["cluster"] = {"placement": str(placement.resolve())}
    sections["policy"] = {
        "name": policy,
        "capacity": capacity,
        "window_ms": 2.0 if mode != "none" else 0.0,
        **({} if balance is None else {"balance": balance}),
    }
    sections["prediction"] = {
        "mode": mode,
        "bundle": str(bundle.resolve()),
        "profile": str(profile.resolve()),
    }
    return _write_config(path, sections)


def _pd_config(
    path: Path,
    prefill: str,
    decode: str,
    placement: Path,
    bundle: Path,
    profile: Path,
    capacity: int,
) -> Path:
    """A scheduler.toml with two [[backend.instances]]: a prefill and a decode emulator."""
    sections = _server_sections()
    del sections["server"]["openai_listen"]
    where = str(placement.resolve())
    sections["backend"]["instances"] = [
        {"name": role, "role": role, "url": url, "placement": where}
        for role, url in (("prefill", prefill), ("decode", decode))
    ]
    sections["policy"] = {"name": "locality_window", "capacity": capacity, "window_ms": 2.0}
    sections["prediction"] = {
        "mode": "text",
        "bundle": str(bundle.resolve()),
        "profile": str(profile.resolve()),
    }
    return _write_config(path, sections)


def served_log(url: str) -> dict[str, Any]:
    """An emulator's ``/admin/requests``."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/admin/requests", timeout=30) as response:
        data: dict[str, Any] = json.load(response)
    return data


def openai_chats(url: str, prompts: list[dict[str, Any]], max_new_tokens: int) -> list[str]:
    """Each prompt as a chat through the scheduler's OpenAI listener at ``url`` (what the
    official ``openai`` package sends); one line per answer, or the error."""
    import urllib.error
    import urllib.request

    def call(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{url}{path}", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer: dict[str, Any] = json.load(response)
        return answer

    model = call("/v1/models")["data"][0]["id"]
    lines = []
    for row in prompts:
        messages = [{"role": "user", "content": row["prompt"]}]
        try:
            reply = call(
                "/v1/chat/completions",
                {"model": model, "messages": messages, "max_tokens": max_new_tokens},
            )
        except urllib.error.HTTPError as e:
            lines.append(f"ERROR {e.code}: {e.read()[:200].decode(errors='replace')}")
            continue
        usage = reply["usage"]
        lines.append(
            f"ok: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion "
            f"tokens, {reply['choices'][0]['finish_reason']}"
        )
    return lines


def leg_rows(result: dict[str, Any], logs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per leg of the disaggregated run: what the scheduler chose (replay records) and
    what each emulator served (its request log)."""
    ok = [r for r in result["records"] if r["status"] == "OK"]
    rows = []
    for leg, instance_key, rank_key_ in (
        ("prefill", "prefill_instance", "prefill_rank"),
        ("decode", "instance", "rank"),
    ):
        ranks: dict[tuple[str, int], int] = {}
        for r in ok:
            if instance_key in r:
                key = (r[instance_key], r[rank_key_])
                ranks[key] = ranks.get(key, 0) + 1
        log = logs[leg]
        served = sum(1 for row in log["requests"] if row["outcome"] == "ok")
        counts = list(ranks.values())
        rows.append(
            {
                "leg": leg,
                "instances": sorted({k[0] for k in ranks}),
                "requests": sum(counts),
                "served_by_emulator": served,
                "ranks_used": len(ranks),
                "rank_load_max_over_mean": max(counts) / (sum(counts) / len(counts))
                if counts
                else 0.0,
                "prefill_rank_honoured": sum(log.get("disagg_prefill_dp_rank_honoured", [])),
            }
        )
    return rows


def render_legs(name: str, result: dict[str, Any]) -> str:
    lines = [
        f"Prefill/decode disaggregated ({name}): "
        f"{result['statuses'].get('OK', 0)} of {result['requests']} OK, p50 "
        f"{result['latency_p50_s'] * 1e3:.1f} ms, p99 {result['latency_p99_s'] * 1e3:.1f} ms, "
        f"inter-node bytes/token (both legs) {result['inter_node_bytes_per_token'] or 0:,.0f}",
        "",
        "| leg | instance | requests (scheduler) | served (emulator) | DP ranks used | "
        "rank load max/mean | decode found KV on the named prefill rank |",
        "|" + "---|" * 7,
    ]
    for row in result["legs"]:
        honoured = row["prefill_rank_honoured"] if row["leg"] == "decode" else ""
        lines.append(
            f"| {row['leg']} | {', '.join(row['instances'])} | {row['requests']:,} | "
            f"{row['served_by_emulator']:,} | {row['ranks_used']} | "
            f"{row['rank_load_max_over_mean']:.2f} | {honoured} |"
        )
    return "\n".join(lines)


def heldout_prompts(data: Path, limit: int, seed: int) -> list[dict[str, Any]]:
    """Prompts the bundled classifier did not train on (``fit``'s held-out split)."""
    import numpy as np

    from scheduler.prediction.training import FitConfig, domain_split

    prompts, _, test = domain_split(FitConfig(data_dir=data))
    rng = np.random.default_rng(seed)
    rows = rng.permutation(test)[:limit]
    return [
        {"id": str(i), "prompt": str(prompts.texts[r]), "domain": str(prompts.domains[r])}
        for i, r in enumerate(rows)
    ]


def per_rank_bytes(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    for r in records:
        if r.get("inter_node_bytes") is not None:
            out[rank_key(r)] = out.get(rank_key(r), 0.0) + r["inter_node_bytes"]
    return out


def step_at_load(result: dict[str, Any], model: Any, cost: Any) -> dict[str, float]:
    """What one decode step costs at the run's load, from what was served.

    The mean number of requests in flight (Little's law: throughput x mean latency) is
    spread over the ranks as the requests were; each in-flight request sends one
    token's inter-node bytes per step, at its rank's measured bytes per token. The
    busiest rank's bytes set the all-to-all time (the kernels pad to it): the modelled
    MoE-layer time's dispatch + combine over the NIC, per layer (the shared cost model;
    the expert term needs GPU loads the serving path does not record).
    """
    from scheduler.accounting import bytes_per_copy

    ok = [r for r in result["records"] if r["status"] == "OK"]
    measured = [r for r in ok if r.get("inter_node_bytes") is not None]
    if not ok or not measured:
        return {"max_rank_bytes_per_step": 0.0, "moe_layer_us": 0.0, "in_flight": 0.0}
    in_flight = result["throughput_rps"] * sum(r["latency_s"] for r in ok) / len(ok)
    sent: dict[tuple[str, int], float] = {}
    tokens: dict[tuple[str, int], int] = {}
    requests: dict[tuple[str, int], int] = {}
    for r in ok:
        requests[rank_key(r)] = requests.get(rank_key(r), 0) + 1
    for r in measured:
        key = rank_key(r)
        sent[key] = sent.get(key, 0.0) + r["inter_node_bytes"]
        tokens[key] = tokens.get(key, 0) + r["prompt_tokens"] + r["completion_tokens"]
    per_step = {
        rank: in_flight * requests[rank] / len(ok) * sent[rank] / max(tokens[rank], 1)
        for rank in sent
    }
    busiest = max(per_step.values())
    size = bytes_per_copy(model.hidden_size)
    per_layer = busiest / max(model.num_moe_layers, 1)
    layer_us = cost.all_to_all_us(per_layer * size.dispatch / size.total) + cost.all_to_all_us(
        per_layer * size.combine / size.total
    )
    return {"max_rank_bytes_per_step": busiest, "moe_layer_us": layer_us, "in_flight": in_flight}


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler.accounting import CostModel
    from scheduler.model_shape import ModelShape
    from scheduler.placement.io import PLAN
    from scheduler.placement.topology import Topology

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for path, what in (
        (args.placement / PLAN, "placement"),
        (args.bundle, "bundle"),
        (args.profile, "profile"),
    ):
        if not path.exists():
            raise ConfigError(f"--{what}: {path} not found")
    plan = json.loads((args.placement / PLAN).read_text())
    nodes, per_node = plan["cluster"]["nodes"], plan["cluster"]["gpus_per_node"]
    model = ModelShape.from_dict(plan["model"])
    runs: list[tuple[str, str, float | None]] = [("round_robin", "none", None)]
    runs += [("locality_window", "text", b) for b in args.balance]
    cost = CostModel.from_topology(Topology(nodes, per_node))

    print(
        f"demo: {args.requests} held-out real prompts at {args.rate:g}/s, "
        f"{nodes} nodes x {per_node} GPUs, {model.name}",
        flush=True,
    )
    prompts = heldout_prompts(args.data, args.requests, args.seed)
    processes: list[Child] = []
    results: dict[str, Any] = {}
    pd_result: dict[str, Any] | None = None
    openai_failed = 0
    try:
        redundant = plan["cluster"].get("redundant_experts", 0)

        def start(name: str, argv: list[str], ready: str) -> tuple[Child, str]:
            child = spawn(name, [*_command(), *argv], out)
            processes.append(child)
            return child, child.wait_for(ready)

        def start_emulator(name: str, *role: str) -> str:
            _, url = start(name, ["emulate", *role, *emulator_args], r"listening on (http://\S+)")
            print(f"{name}: {url} (log {out / f'{name}.err'})", flush=True)
            return url

        emulator_args = [
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            str(per_node),
            "--model",
            model.name,
            "--init-expert-location",
            str(args.placement / "expert_location.json"),
            "--ep-num-redundant-experts",
            str(redundant),
            "--port",
            "0",
            "--capacity",
            str(args.capacity),
            "--data",
            str(args.data),
            "--time-scale",
            str(args.time_scale),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--seed",
            str(args.seed),
        ]
        backend = start_emulator("emulator")
        for policy, mode, balance in runs:
            stem = f"{policy}+{mode}" + ("" if balance is None else f"-balance{balance:g}")
            name = f"{policy}+{mode}" + ("" if balance is None else f", balance {balance:g}")
            config = _config(
                out / f"{stem}.toml",
                backend,
                args.placement,
                policy,
                mode,
                args.bundle,
                args.profile,
                args.capacity,
                balance,
            )
            server, target = start(stem, ["serve", "--config", str(config)], GRPC_READY)
            print(f"scheduler {name}: {target}; replaying ...", flush=True)
            result = asyncio.run(
                replay(
                    target, prompts, rate=args.rate, max_new_tokens=args.max_new_tokens, timeout=60
                )
            )
            if (policy, mode, balance) == runs[-1]:
                url = server.wait_for(r"openai listening on (\S+)")
                chats = openai_chats(url, prompts[:OPENAI_CHATS], args.max_new_tokens)
                print(f"the same scheduler's OpenAI front door, {url}/v1/chat/completions:")
                for line in chats:
                    print(f"  {line}")
                openai_failed = sum(not line.startswith("ok") for line in chats)
            result["max_rank_inter_node_bytes"] = max(
                per_rank_bytes(result["records"]).values(), default=0.0
            )
            result["step_at_load"] = step_at_load(result, model, cost)
            results[name] = result
            server.stop()
            processes.remove(server)
        if args.pd:
            for mixed in [p for p in processes if p.name == "emulator"]:
                mixed.stop()  # its cores go to the pair
                processes.remove(mixed)
            prefill = start_emulator(
                "prefill-emulator", "--role", "prefill", "--disaggregation-bootstrap-port", "0"
            )
            decode = start_emulator("decode-emulator", "--role", "decode")
            config = _pd_config(
                out / "pd.toml",
                prefill,
                decode,
                args.placement,
                args.bundle,
                args.profile,
                args.capacity,
            )
            server, target = start("pd", ["serve", "--config", str(config)], GRPC_READY)
            print(f"scheduler locality_window+text, prefill/decode: {target}; replaying ...")
            pd_result = asyncio.run(
                replay(
                    target, prompts, rate=args.rate, max_new_tokens=args.max_new_tokens, timeout=60
                )
            )
            logs = {"prefill": served_log(prefill), "decode": served_log(decode)}
            pd_result["legs"] = leg_rows(pd_result, logs)
    finally:
        for p in reversed(processes):
            p.stop()

    table = render_table(results)
    if pd_result is not None:
        table += "\n\n" + render_legs(PD_NAME, pd_result)
    print()
    print(table)
    report = out / "serving.md"
    report.write_text(
        "# Serving demo\n\n"
        f"{args.requests} held-out real prompts (the classifier never trained on them) at "
        f"{args.rate:g} requests/s, {args.max_new_tokens} new tokens each, through the gRPC "
        f"scheduler to the SGLang emulator ({nodes} nodes x {per_node} GPUs, {model.name}, "
        f"placement `{args.placement}`). The emulator's routed experts are **drawn** from "
        "real per-class ESFT profiles by each prompt's true domain (docs/emulator.md), "
        "not measured on a GPU; the scheduler predicts the domain from the text.\n\n" + table + "\n"
    )
    everything = {**results, **({PD_NAME: pd_result} if pd_result is not None else {})}
    for result in everything.values():
        result.pop("records")
    write_json_atomic(out / "serving.json", everything, indent=2)
    print(f"\nreport: {report}; raw: {out / 'serving.json'}; logs: {out}/*.err")
    failed = sum(r["requests"] - r["statuses"].get("OK", 0) for r in everything.values())
    return 0 if failed == 0 and openai_failed == 0 else 1


def render_table(results: dict[str, Any]) -> str:
    header = (
        "| policy + prediction | inter-node bytes/token | max-rank inter-node MB | "
        "busiest rank MB/step | modelled all-to-all us/MoE layer | "
        "rank load max/mean | local fraction | measured requests | p50 ms | p99 ms | req/s | "
        "failed |"
    )
    lines = [header, "|" + "---|" * 12]
    for name, r in results.items():
        failed = r["requests"] - r["statuses"].get("OK", 0)
        step = r["step_at_load"]
        lines.append(
            f"| {name} | {r['inter_node_bytes_per_token'] or 0:,.0f} | "
            f"{r['max_rank_inter_node_bytes'] / 1e6:,.1f} | "
            f"{step['max_rank_bytes_per_step'] / 1e6:,.2f} | {step['moe_layer_us']:,.1f} | "
            f"{r['rank_requests_max_over_mean'] or 0:.2f} | {r['local_fraction_mean'] or 0:.3f} | "
            f"{r['measured_requests']:,} | "
            f"{r['latency_p50_s'] * 1e3:.1f} | {r['latency_p99_s'] * 1e3:.1f} | "
            f"{r['throughput_rps']:.0f} | {failed} |"
        )
    names = list(results)
    base = names[0] if names else ""
    a = results[base]["step_at_load"]["moe_layer_us"] if names else 0.0
    x = results[base]["inter_node_bytes_per_token"] if names else 0.0
    notes = []
    for name in names[1:]:
        b = results[name]["step_at_load"]["moe_layer_us"]
        y = results[name]["inter_node_bytes_per_token"]
        if a and b and x and y:
            time_change = 100 * (b / a - 1)
            bytes_change = 100 * (y / x - 1)
            notes.append(
                f"{name} {'cuts' if time_change < 0 else 'raises'} the modelled all-to-all "
                f"time per MoE layer by {abs(time_change):.1f}% against {base} at the "
                f"demo's load ({results[name]['step_at_load']['in_flight']:.0f} requests "
                f"in flight; the kernels pay for the busiest rank), while mean inter-node "
                f"bytes per token {'fall' if bytes_change < 0 else 'rise'} "
                f"{abs(bytes_change):.1f}%."
            )
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
        lines.append("")
        lines.append("Modelled from the served bytes, not timed on a GPU.")
    return "\n".join(lines)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="emulator + scheduler end to end: round_robin vs ours at two settings"
    )
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="real data")
    p.add_argument("--placement", type=Path, required=True, help="`place` output directory")
    p.add_argument("--profile", type=Path, required=True, help="profile the placement used")
    p.add_argument("--bundle", type=Path, required=True, help="`fit` output")
    p.add_argument("--out", type=Path, default=Path("demo-output/serving"))
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--capacity", type=int, default=32, help="running requests per rank")
    p.add_argument("--time-scale", type=float, default=1.0, help="emulator time scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--balance",
        type=float,
        nargs="+",
        default=list(DEMO_BALANCES),
        help="locality_window's [policy] balance settings to run (default "
        f"{' '.join(f'{b:g}' for b in DEMO_BALANCES)})",
    )
    p.add_argument(
        "--no-pd",
        dest="pd",
        action="store_false",
        help="skip the prefill/decode disaggregated run (a prefill and a decode emulator)",
    )
    p.set_defaults(handler=cmd_demo)
