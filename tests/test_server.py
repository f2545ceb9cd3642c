"""The gRPC scheduler in front of a real emulator, both on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scheduler.client import SchedulerClient
from tests.emulator_harness import EmulatorServer, make_emulator
from tests.server_harness import SchedulerServer, write_config


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_unary_and_streaming_generation(tmp_path: Path) -> None:
    with (
        EmulatorServer(make_emulator()) as emu,
        SchedulerServer(write_config(tmp_path, emu.url)) as s,
    ):

        async def go() -> None:
            async with SchedulerClient(s.target) as client:
                reply = await client.generate("solve 2x + 3 = 7 for x", max_new_tokens=5)
                assert reply.info.completion_tokens == 5
                assert len(reply.output_ids) == 5
                assert 0 <= reply.info.dp_rank < 4
                assert reply.info.prediction_source == "text"
                assert reply.info.predicted_class == "law"  # math -> law stand-in
                assert reply.info.HasField("local_fraction")
                chunks = [c async for c in client.generate_stream("hello there", max_new_tokens=4)]
                assert chunks[-1].finished and chunks[-1].info.completion_tokens == 4
                assert sum(len(c.output_ids) for c in chunks[:-1]) == 4
                stats = await client.stats()
                assert stats.requests_ok == 2 and stats.token_layers > 0

        run(go())
