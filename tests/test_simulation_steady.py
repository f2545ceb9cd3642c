"""Production-size replay (scheduler.simulation.steady) and its lower bound."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from scheduler.accounting import CostModel, account
from scheduler.cli import main
from scheduler.model_shape import ModelShape
from scheduler.placement.io import to_sglang
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology
from scheduler.policies import make_policy
from scheduler.simulation import load_workload
from scheduler.simulation.steady import SteadyConfig, StepBound, decode_timeline, replay_steady
from scheduler.traces.store import RequestTrace, TraceSet
from tests.conftest import labelled_records, random_token_ids, write_store

TOPOLOGY = Topology(nodes=2, gpus_per_node=2)


def placement_for(model: ModelShape, redundant: int = 0) -> Placement:
    slots = model.num_experts + redundant
    return Placement.trivial(model.num_moe_layers, model.num_experts, slots, 4, 2)


@pytest.fixture
def workload(tmp_path: Path, tiny_model: ModelShape):
    store = write_store(tmp_path / "store", tiny_model, labelled_records(tiny_model, 12))
    return load_workload(TraceSet(store))


@pytest.mark.parametrize("policy", ["round_robin", "total_requests", "locality_window"])
def test_decode_keeps_every_rank_full_and_stays_above_the_bound(workload, tiny_model, policy):
    placement = placement_for(tiny_model)
    params = {"placement": placement} if policy == "locality_window" else {}
    config = SteadyConfig(phase="decode", running_per_rank=6, steps=12, seed=1)
    s = replay_steady(
        workload, make_policy(policy, **params), placement, TOPOLOGY, tiny_model, config, bound=True
    )
    assert s.resampled and s.steps == 12 and s.tokens == 12 * 4 * 6
    assert s.rank_load_imbalance_mean == pytest.approx(1.0)
    assert s.bound_moe_layer_time_us_mean <= s.moe_layer_time_us_mean + 1e-9
    assert s.moe_layer_time_us_mean == pytest.approx(
        s.latency_us_mean + s.bytes_us_mean + s.expert_us_mean
    )
    assert s.weight_read_us_mean > 0 and s.distinct_experts_per_gpu_step_mean > 0
    assert s.fallback_assignments == 0


def test_decode_timeline_is_the_same_for_every_policy(workload, tiny_model):
    config = SteadyConfig(phase="decode", running_per_rank=3, steps=8, seed=2)
    first = decode_timeline(workload, 4, config)
    second = decode_timeline(workload, 4, config)
    for a, b in zip(first[1], second[1], strict=True):
        assert (a == b).all()
    # Replacements follow finishes: a slot gets a new request right after its last token.
    for step in range(1, 8):
        new = first[2][step]
        assert set(new.tolist()) <= set(range(12))


def test_prefill_packs_chunks_of_t_tokens_per_rank(workload, tiny_model):
    placement = placement_for(tiny_model)
    config = SteadyConfig(phase="prefill", prefill_tokens_per_rank=10, steps=5)
    s = replay_steady(
        workload, make_policy("round_robin"), placement, TOPOLOGY, tiny_model, config, bound=True
    )
    assert s.tokens == 5 * 4 * 10 and s.requests_drawn >= 5 * 4 * 10 / 6
    assert s.bound_moe_layer_time_us_mean <= s.moe_layer_time_us_mean + 1e-9


@pytest.mark.parametrize("redundant", [0, 4])
@pytest.mark.parametrize("seed", range(4))
def test_bound_holds_for_every_assignment(tiny_model, redundant, seed):
    """Brute force: every assignment of 4 tokens to the 4 ranks costs at least the bound."""
    rng = np.random.default_rng(seed)
    model = tiny_model
    if redundant:
        rows = [rng.permutation(np.r_[np.arange(8), rng.integers(0, 8, 4)]) for _ in range(3)]
        placement = Placement(np.array(rows), 8, 4, 2)
    else:
        placement = placement_for(model)
    cost = CostModel(latency_us=1.0)
    ids = np.stack([random_token_ids(rng, 1, model, int(rng.integers(8)))[0] for _ in range(4)])
    bound = StepBound(placement, model, cost)(ids)
    best = min(
        cost.padded_layer_time(
            account(placement, TOPOLOGY, model, np.array(ranks), ids, per_layer=True), model
        ).total_us
        for ranks in itertools.product(range(4), repeat=4)
    )
    assert bound <= best + 1e-9


def _cli_setup(tmp_path: Path, model: ModelShape, records: list[RequestTrace]) -> list[str]:
    store = write_store(tmp_path / "store", model, records)
    place = tmp_path / "place"
    place.mkdir()
    placement = Placement.trivial(model.num_moe_layers, model.num_experts, model.num_experts, 4, 2)
    (place / "expert_location.json").write_text(json.dumps(to_sglang(placement, model)))
    topo = tmp_path / "topo.toml"
    topo.write_text('[cluster]\nnodes = 2\ngpus_per_node = 2\n[gpu]\ntype = "H20"\n')
    return ["simulate", "--traces", str(store), "--placement", str(place), "--topology", str(topo)]


def test_cli_production_size_and_errors(tmp_path, tiny_model, capsys):
    base = _cli_setup(tmp_path, tiny_model, labelled_records(tiny_model, 4))
    out = tmp_path / "s.json"
    args = [*base, "--policy", "round_robin", "--running-per-rank", "4"]
    assert main(args) == 2
    assert "add --resample" in capsys.readouterr().err
    assert main([*base, "--policy", "round_robin", "--bound"]) == 2
    assert "production-size replay" in capsys.readouterr().err
    both = [*args, "--prefill-tokens-per-rank", "8", "--resample", "--steps", "3", "--bound"]
    assert main([*both, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RESAMPLED" in text and "bound (any scheduler)" in text
    summary = json.loads(out.read_text())
    for phase in ("decode", "prefill"):
        for key in (
            "moe_layer_time_us_mean",
            "node_copies_per_token_layer",
            "max_rank_inter_node_bytes_mean",
            "rank_load_imbalance_mean",
            "gpu_load_imbalance_mean",
            "weight_read_us_mean",
            "distinct_experts_per_gpu_step_mean",
        ):
            assert np.isfinite(summary[phase][key]), (phase, key)
        assert summary[phase]["phase"] == phase and summary[phase]["resampled"] is True


def test_cli_unseen_top1_model_and_one_phase_trace(tmp_path, capsys):
    # A shape with no preset: 16 experts, top-1, MoE every other layer; prefill only.
    model = ModelShape("unseen-top1", 6, (1, 3, 5), 16, 1, 32)
    rng = np.random.default_rng(0)
    records = [
        RequestTrace.from_token_ids(
            f"r{i}", {"prefill": random_token_ids(rng, 12, model, 0)}, model.num_experts
        )
        for i in range(10)
    ]
    base = _cli_setup(tmp_path, model, records)
    decode = [*base, "--policy", "round_robin", "--running-per-rank", "4", "--resample"]
    assert main(decode) == 2
    err = capsys.readouterr().err
    assert "no request records decode routing" in err and "--phase prefill" in err
    assert main([*decode, "--split-phase", "--steps", "2"]) == 0
    assert "split half/half" in capsys.readouterr().out
    prefill = [*base, "--policy", "round_robin", "--prefill-tokens-per-rank", "16", "--resample"]
    assert main([*prefill, "--steps", "2", "--bound"]) == 0
    assert "prefill" in capsys.readouterr().out
