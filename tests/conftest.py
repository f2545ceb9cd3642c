from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scheduler.model_shape import ModelShape
from scheduler.traces.store import RequestTrace, TraceWriter

REPO = Path(__file__).resolve().parents[1]


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
