"""One physics: the same requests through the simulator and through server + emulator
give the same rank choices and the same accounting for the same arrivals.

The server (locality_window, one scheduling window that takes every request) fronts an
emulator on loopback; each request carries a class hint, so the policy sees the
server's own class histogram. The simulator replays the very routed experts the
emulator returned, with the RequestInfo the server built, arriving in the same order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from scheduler.client import SchedulerClient
from scheduler.policies import make_policy
from scheduler.simulation import SimulationConfig, Workload, simulate
from scheduler.traces.importers.sglang_generate import decode_routed_experts
from scheduler.traces.store import expert_counts
from tests.emulator_harness import MODEL, EmulatorServer, make_emulator
from tests.server_harness import CLASSES, SchedulerServer, write_config

REQUESTS = 12
MAX_NEW_TOKENS = 5
PROMPTS = [f"request {i}: " + "please translate this sentence " * (1 + i % 3) for i in range(12)]


def test_simulator_and_server_agree_on_ranks_and_accounting(tmp_path: Path) -> None:
    hints = [CLASSES[i % len(CLASSES)] for i in range(REQUESTS)]
    policy = {"name": "locality_window", "capacity": 4, "window_ms": 5_000.0}
    with EmulatorServer(make_emulator()) as emu:
        config = write_config(
            tmp_path,
            emu.url,
            policy={**policy, "max_window": REQUESTS},
            backend={"routed_experts_budget_cores": 0.0, "routed_experts_fraction": 1.0},
        )
        with SchedulerServer(config) as s:
            assert s.running is not None
            core = s.running.core

            async def go() -> list:  # type: ignore[type-arg]
                async with SchedulerClient(s.target) as client:
                    calls = []
                    for i, (prompt, hint) in enumerate(zip(PROMPTS, hints, strict=True)):
                        calls.append(
                            asyncio.ensure_future(
                                client.generate(
                                    prompt,
                                    max_new_tokens=MAX_NEW_TOKENS,
                                    class_hint=hint,
                                    request_id=f"r{i}",
                                    timeout=30,
                                )
                            )
                        )
                        if i + 1 < REQUESTS:  # the next arrives once this one is queued
                            for _ in range(500):
                                if s.call(lambda: core.dispatcher.queued) == i + 1:
                                    break
                                await asyncio.sleep(0.01)
                            else:
                                raise AssertionError(f"request {i} was never queued")
                    return list(await asyncio.gather(*calls))

            replies = asyncio.run(go())
            infos = [  # what the server's policy saw (its estimate of the prompt's tokens)
                s.call(
                    lambda r=r, h=h: core.predictor.from_hint(
                        h, r.info.prompt_tokens + MAX_NEW_TOKENS
                    )
                )
                for r, h in zip(replies, hints, strict=True)
            ]
            placement = core.cluster.placement
            topology = core.cluster.topology

    served_ranks = [r.info.dp_rank for r in replies]
    served_bytes = sum(r.info.inter_node_bytes for r in replies)
    assert all(r.info.HasField("inter_node_bytes") for r in replies)

    # The same requests for the simulator: the emulator's own routed experts (a
    # deterministic function of seed, prompt and length), the server's predictions.
    emulator = make_emulator()
    ids, prefill = [], []
    for prompt, reply in zip(PROMPTS, replies, strict=True):
        plan = emulator.plan(
            {"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS}}
        )
        assert plan.prompt_tokens == reply.info.prompt_tokens
        rows = decode_routed_experts(emulator.routed_experts(plan), MODEL)
        ids.append(rows[:, list(MODEL.moe_layer_ids), :])
        prefill.append(plan.prompt_tokens)
    lengths = np.array([len(i) for i in ids])
    pre = np.array(prefill)
    token_ids = np.concatenate(ids).astype(np.int16)
    workload = Workload(
        request_ids=[f"r{i}" for i in range(REQUESTS)],
        labels=[p.cls for p in infos],
        token_ids=token_ids,
        offset=np.concatenate([[0], np.cumsum(lengths)])[:-1],
        prefill=pre,
        decode=lengths - pre,
        arrival_s=np.arange(REQUESTS) * 1e-6,  # the served order
        histogram=np.stack([p.histogram for p in infos]),
        split_phase=0,
    )
    assert expert_counts(token_ids, MODEL.num_experts).sum() > 0
    sim = simulate(
        workload,
        make_policy("locality_window", placement=placement),
        placement,
        topology,
        MODEL,
        SimulationConfig(capacity=4, window_ms=5_000.0, max_window=REQUESTS),
    )
    assert len(set(served_ranks)) > 1  # the policy chose, not a default
    assert sim.rank.tolist() == served_ranks
    assert sim.summary.inter_node_bytes == served_bytes
