"""Simulator window mode (SimulationConfig.window_ms, max_window: the shared admission of
scheduler/policies/admission.py) and per-layer padded step times."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.model_shape import ModelShape
from scheduler.placement.io import to_sglang
from scheduler.policies import RankState, RequestInfo, RoutingPolicy, make_policy
from scheduler.simulation import SimulationConfig, Workload, load_workload, simulate
from scheduler.traces.store import TraceSet
from tests.conftest import labelled_records, write_store
from tests.test_simulation import SHARES, TOPOLOGY, matching_placement

POLICY_NAMES = [
    "round_robin",
    "total_requests",
    "class_affinity",
    "locality_band",
    "locality_window",
]


@pytest.fixture
def workload(tmp_path: Path, tiny_model: ModelShape) -> Workload:
    store = write_store(tmp_path / "store", tiny_model, labelled_records(tiny_model, 12))
    return load_workload(TraceSet(store))


def policy(name: str, model: ModelShape) -> RoutingPolicy:
    params: dict = {}
    if name == "class_affinity":
        params = {"class_to_node_share": SHARES}
    if name in ("locality_band", "locality_window"):
        params = {"placement": matching_placement(model)}
    return make_policy(name, **params)


def run(workload: Workload, model: ModelShape, name: str, **config):
    cfg = SimulationConfig(**{"capacity": 2, **config})
    return simulate(workload, policy(name, model), matching_placement(model), TOPOLOGY, model, cfg)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_window_mode_conserves_requests_and_decides_when_the_oldest_has_waited(
    workload, tiny_model, name
):
    window = 0.05  # ms: several steps of the tiny model
    result = run(workload, tiny_model, name, rate=2000.0, seed=1, window_ms=window)
    s = result.summary
    assert (result.finished == 1).all() and s.requests == len(workload)
    assert (result.tokens == workload.prefill + workload.decode).all()
    assert (result.start_s >= result.arrival_s).all()
    # Every admission happened when the oldest request then queued (arrived, not yet
    # started) had waited at least one window: the queue (24 requests) never fills max_window.
    for t in np.unique(result.start_s):
        queued = (result.arrival_s <= t) & (result.start_s >= t)
        assert t - result.arrival_s[queued].min() >= window / 1e3 - 1e-12
    assert len(np.unique(result.start_s)) <= result.decisions
    assert s.window_ms == window and s.max_window == 256
    assert run(workload, tiny_model, name, rate=2000.0, seed=1, window_ms=window).summary == s


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_capacity_holds_in_window_mode(workload, tiny_model, name):
    result = run(workload, tiny_model, name, capacity=1, window_ms=0.02)  # all arrive at 0
    for rank in range(4):
        on = result.rank == rank
        order = np.argsort(result.start_s[on])
        starts, ends = result.start_s[on][order], result.finish_s[on][order]
        assert (starts[1:] >= ends[:-1]).all()


def test_default_window_is_per_request_fifo(workload, tiny_model):
    a = run(workload, tiny_model, "locality_window", rate=200.0, seed=3)
    b = run(workload, tiny_model, "locality_window", rate=200.0, seed=3, window_ms=0.0)
    assert a.summary == b.summary and a.summary.window_ms == 0.0
    assert a.decisions >= len(workload)  # one choose_rank per admission at least


def test_locality_window_beats_round_robin(workload, tiny_model):
    rr = run(workload, tiny_model, "round_robin", rate=2000.0, window_ms=0.05).summary
    ours = run(workload, tiny_model, "locality_window", rate=2000.0, window_ms=0.05).summary
    assert ours.remote_hits < 0.8 * rr.remote_hits
    assert ours.moe_layer_time_us_mean <= rr.moe_layer_time_us_mean


class HalfRefuser(RoutingPolicy):
    """Admits only the first request of each window (to check the queue keeps order)."""

    name = "half_refuser"

    def choose_rank(self, request: RequestInfo, ranks: RankState) -> int | None:
        return ranks.least_loaded()

    def choose_ranks(self, requests: Sequence[RequestInfo], ranks: RankState) -> list[int | None]:
        return [ranks.least_loaded(), *[None] * (len(requests) - 1)]


def test_refused_requests_stay_queued_oldest_first(workload, tiny_model):
    cfg = SimulationConfig(capacity=2, window_ms=0.01)
    result = simulate(
        workload, HalfRefuser(), matching_placement(tiny_model), TOPOLOGY, tiny_model, cfg
    )
    assert (result.finished == 1).all()
    # all arrive at 0 in a shuffled order; admissions keep that order
    from scheduler.simulation.replay import arrival_times

    _, _, order = arrival_times(workload, cfg)
    starts = result.start_s[order]
    assert (np.diff(starts) >= 0).all()
    # a decision that assigned someone is followed at once by another: each decision
    # admits one, and the first (at one window) fills all 4 ranks x 2 slots
    assert result.decisions >= len(workload)
    assert starts[0] == pytest.approx(1e-5) and (starts == starts[0]).sum() == 8


def test_padded_layer_time_is_used_and_summary_has_imbalances(workload, tiny_model):
    s = run(workload, tiny_model, "round_robin", rate=200.0).summary
    assert s.gpu_load_imbalance_worst >= s.gpu_load_imbalance_mean >= 1.0
    assert s.rank_token_imbalance >= 1.0
    assert s.inter_node_bytes > 0


def test_window_config_and_cli(tmp_path, tiny_model, capsys):
    with pytest.raises(ValueError, match="window"):
        SimulationConfig(window_ms=-1.0)
    store = write_store(tmp_path / "store", tiny_model, labelled_records(tiny_model, 4))
    place = tmp_path / "place"
    place.mkdir()
    (place / "expert_location.json").write_text(
        json.dumps(to_sglang(matching_placement(tiny_model), tiny_model))
    )
    topo = tmp_path / "topo.toml"
    topo.write_text("[cluster]\nnodes = 2\ngpus_per_node = 2\n")
    base = ["simulate", "--traces", str(store), "--placement", str(place), "--topology", str(topo)]
    out = tmp_path / "sim.json"
    args = [*base, "--policy", "locality_window", "--window-ms", "0.05", "--json", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["window_ms"] == 0.05
    assert "window 0.05 ms" in capsys.readouterr().out
    assert main([*base, "--policy", "round_robin", "--window-ms", "-2"]) == 2
    assert "--window-ms must be >= 0" in capsys.readouterr().err
