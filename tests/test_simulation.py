from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.errors import ConfigError
from scheduler.model_shape import ModelShape
from scheduler.placement.io import to_sglang
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology
from scheduler.policies import make_policy
from scheduler.simulation import SimulationConfig, Workload, load_workload, simulate
from scheduler.traces.store import RequestTrace, TraceSet
from tests.conftest import labelled_records, write_store

TOPOLOGY = Topology(nodes=2, gpus_per_node=2)
#: code favours expert 0 (node 0), math expert 5 (node 1).
SHARES = {"code": [1.0, 0.0], "math": [0.0, 1.0]}


def matching_placement(model: ModelShape) -> Placement:
    """Experts 0-3 on node 0, 4-7 on node 1, in every MoE layer."""
    row = np.array([0, 1, 2, 3, 5, 4, 6, 7])
    return Placement(np.tile(row, (model.num_moe_layers, 1)), model.num_experts, 4, 2)


@pytest.fixture
def workload(tmp_path: Path, tiny_model: ModelShape) -> Workload:
    store = write_store(tmp_path / "store", tiny_model, labelled_records(tiny_model, 12))
    return load_workload(TraceSet(store))


def run(workload: Workload, model: ModelShape, name: str, **config):
    params: dict = {}
    if name == "class_affinity":
        params = {"class_to_node_share": SHARES}
    if name == "locality_band":
        params = {"placement": matching_placement(model)}
    policy = make_policy(name, **params)
    cfg = SimulationConfig(**{"capacity": 2, **config})
    return simulate(workload, policy, matching_placement(model), TOPOLOGY, model, cfg)


@pytest.mark.parametrize(
    "name", ["round_robin", "total_requests", "class_affinity", "locality_band"]
)
def test_conservation(workload, tiny_model, name):
    result = run(workload, tiny_model, name, rate=200.0, seed=3)
    s = result.summary
    assert (result.finished == 1).all()
    assert s.requests == len(workload) == 24
    assert s.tokens == len(workload.token_ids) == 24 * 10
    assert (result.tokens == workload.prefill + workload.decode).all()
    assert s.token_layers == s.tokens * tiny_model.num_moe_layers
    assert (result.finish_s > result.start_s).all() and (result.start_s >= result.arrival_s).all()
    # one prefill step and 4 decode steps per request, capacity 2 on 4 ranks
    assert s.steps >= 5 * 24 / (2 * 4)
    assert ((result.rank >= 0) & (result.rank < 4)).all()
    assert s.latency_s_p99 >= s.latency_s_p50 > 0
    assert run(workload, tiny_model, name, rate=200.0, seed=3).summary == s  # deterministic


def test_two_phases_replayed_as_recorded(workload):
    assert workload.split_phase == 0
    assert (workload.prefill == 6).all() and (workload.decode == 4).all()


def test_one_phase_split_in_halves(tmp_path, tiny_model):
    ids = np.zeros((5, tiny_model.num_moe_layers, 2), dtype=np.int16)
    ids[:, :, 1] = 1
    record = RequestTrace.from_token_ids("x", {"prefill": ids}, tiny_model.num_experts)
    work = load_workload(TraceSet(write_store(tmp_path / "s", tiny_model, [record])))
    assert (work.split_phase, int(work.prefill[0]), int(work.decode[0])) == (1, 3, 2)


def test_capacity_bounds_concurrency(workload, tiny_model):
    result = run(workload, tiny_model, "total_requests", capacity=1)  # all arrive at 0
    # at most one request per rank at a time: intervals on a rank never overlap
    for rank in range(4):
        on = np.argsort(result.start_s[result.rank == rank])
        starts = result.start_s[result.rank == rank][on]
        ends = result.finish_s[result.rank == rank][on]
        assert (starts[1:] >= ends[:-1]).all()
    assert result.summary.queue_wait_s_p99 > 0


def test_class_affinity_beats_round_robin_on_a_matching_placement(workload, tiny_model):
    rr = run(workload, tiny_model, "round_robin", rate=100.0).summary
    ca = run(workload, tiny_model, "class_affinity", rate=100.0).summary
    lb = run(workload, tiny_model, "locality_band", rate=100.0).summary
    assert ca.remote_hits < 0.8 * rr.remote_hits
    assert lb.remote_hits < 0.8 * rr.remote_hits


def test_config_validation():
    with pytest.raises(ValueError, match="capacity"):
        SimulationConfig(capacity=0)
    with pytest.raises(ValueError, match="rate"):
        SimulationConfig(rate=0.0)


def test_cli_synthetic_and_errors(tmp_path, tiny_model, capsys):
    store = write_store(tmp_path / "store", tiny_model, labelled_records(tiny_model, 4))
    place = tmp_path / "place"
    place.mkdir()
    (place / "expert_location.json").write_text(
        json.dumps(to_sglang(matching_placement(tiny_model), tiny_model))
    )
    (place / "plan.json").write_text(json.dumps({"class_to_node_share": SHARES}))
    topo = tmp_path / "topo.toml"
    topo.write_text("[cluster]\nnodes = 2\ngpus_per_node = 2\n")
    base = ["simulate", "--traces", str(store), "--placement", str(place), "--topology", str(topo)]
    out = tmp_path / "sim.json"
    assert main([*base, "--policy", "class_affinity", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["requests"] == 8
    assert "remote hits / token-layer" in capsys.readouterr().out
    assert main([*base, "--policy", "round_robin", "--capacity", "0"]) == 2
    assert "--capacity must be >= 1" in capsys.readouterr().err
    (place / "plan.json").unlink()
    assert main([*base, "--policy", "class_affinity"]) == 2
    assert "plan.json" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        make_policy("fifo")


def test_cli_on_real_esft(shared_data, tmp_path, capsys):
    esft = shared_data / "traces" / "esft-deepseek-v2-lite"
    store, profile, place = tmp_path / "store", tmp_path / "profile.json", tmp_path / "place"
    topo = tmp_path / "topo.toml"
    topo.write_text("[cluster]\nnodes = 2\ngpus_per_node = 4\n")
    assert main(["import", str(esft), "--out", str(store)]) == 0
    assert main(["profile", str(store), "--out", str(profile)]) == 0
    place_args = ["place", "--profile", str(profile), "--topology", str(topo)]
    assert main([*place_args, "--out", str(place), "--time-limit", "2"]) == 0
    summaries = {}
    for name in ("round_robin", "class_affinity"):
        out = tmp_path / f"{name}.json"
        args = ["simulate", "--traces", str(store), "--placement", str(place)]
        args += ["--topology", str(topo), "--policy", name, "--rate", "200"]
        assert main([*args, "--max-requests", "80", "--json", str(out)]) == 0
        summaries[name] = json.loads(out.read_text())
    assert summaries["round_robin"]["tokens"] == summaries["class_affinity"]["tokens"]
    rr, ca = summaries["round_robin"], summaries["class_affinity"]
    assert ca["remote_hits_per_token_layer"] < rr["remote_hits_per_token_layer"]
    assert "split half prefill/half decode" in capsys.readouterr().out
