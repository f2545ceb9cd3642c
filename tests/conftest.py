from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from scheduler.model_shape import ModelShape
from scheduler.traces.store import RequestTrace, TraceWriter

REPO = Path(__file__).resolve().parents[1]
#: How long a test waits for a condition another thread, process or task brings about:
#: generous, for a loaded 2-core CI machine; a condition already met returns at once.
WAIT_TIMEOUT_S = 60.0

_T = TypeVar("_T")


def wait_until(
    predicate: Callable[[], _T],
    timeout_s: float = WAIT_TIMEOUT_S,
    what: str | Callable[[], str] = "the condition",
) -> _T:
    """Call ``predicate`` until it returns something true, and return that; for state
    another thread or process changes. Between calls it sleeps 1 ms, doubling up to
    50 ms, so a condition is seen within milliseconds and a long wait costs little CPU.
    Raises AssertionError naming ``what`` (a string, or a function giving one: e.g. the
    last state seen) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout_s:g} s: {what() if callable(what) else what}"
            )
        time.sleep(pause)
        pause = min(2 * pause, 0.05)
    return value


async def wait_until_async(
    predicate: Callable[[], object],
    timeout_s: float = WAIT_TIMEOUT_S,
    what: str | Callable[[], str] = "the condition",
) -> None:
    """:func:`wait_until` inside an event loop, for state the loop's other tasks change:
    first a bare yield (``asyncio.sleep(0)``: ready tasks run), then sleeps from 0.5 ms
    doubling up to 50 ms."""
    deadline = time.monotonic() + timeout_s
    pause = 0.0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout_s:g} s: {what() if callable(what) else what}"
            )
        await asyncio.sleep(pause)
        pause = min(max(2 * pause, 0.0005), 0.05)


def render_results(results: Path, md: Path) -> str:
    """``python -m benchmarks.render`` over the JSON files in ``results``: the Markdown it
    writes."""
    command = [sys.executable, "-m", "benchmarks.render", "--results", str(results)]
    subprocess.run([*command, "--out", str(md)], cwd=REPO, check=True, timeout=60)
    return md.read_text()


@pytest.fixture
def tiny_model() -> ModelShape:
    """4 hidden layers (layer 0 dense), 8 experts, top-2."""
    return ModelShape("tiny", 4, (1, 2, 3), 8, 2, 16)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (../shared/data, or $MOE_SCHEDULER_DATA); skip if absent."""
    path = Path(os.environ.get("MOE_SCHEDULER_DATA", REPO.parent / "shared" / "data"))
    if not (path / "traces").is_dir():
        pytest.skip(f"real data not found at {path} (set MOE_SCHEDULER_DATA)")
    return path


def random_token_ids(
    rng: np.random.Generator, tokens: int, model: ModelShape, favourite: int | None = None
) -> np.ndarray:
    """[tokens, moe_layers, top_k] distinct expert ids per token; optionally biased."""
    out = np.empty((tokens, model.num_moe_layers, model.top_k), dtype=np.int16)
    weights = np.ones(model.num_experts)
    if favourite is not None:
        weights[favourite] = 20.0
    weights /= weights.sum()
    for t in range(tokens):
        for layer in range(model.num_moe_layers):
            out[t, layer] = rng.choice(model.num_experts, model.top_k, replace=False, p=weights)
    return out


def write_store(path: Path, model: ModelShape, records: list[RequestTrace], **kw: object) -> Path:
    with TraceWriter(path, model, **kw) as w:  # type: ignore[arg-type]
        for r in records:
            w.add(r)
    return path


def labelled_records(model: ModelShape, per_class: int = 8, seed: int = 0) -> list[RequestTrace]:
    """Two classes whose tokens favour different experts (0 and 5); prefill + decode."""
    rng = np.random.default_rng(seed)
    records = []
    for label, fav in (("code", 0), ("math", 5)):
        for i in range(per_class):
            records.append(
                RequestTrace.from_token_ids(
                    f"{label}-{i}",
                    {
                        "prefill": random_token_ids(rng, 6, model, fav),
                        "decode": random_token_ids(rng, 4, model, fav),
                    },
                    model.num_experts,
                    label=label,
                    prompt=f"prompt {label} {i}",
                )
            )
    return records
