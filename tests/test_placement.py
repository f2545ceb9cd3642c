import itertools
import json

import numpy as np
import pytest

from scheduler.accounting.cost_model import CostModel
from scheduler.cli import main
from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import ModelShape
from scheduler.placement.io import from_sglang, to_sglang
from scheduler.placement.methods import get_method
from scheduler.placement.methods.ours_time import evaluate_rows
from scheduler.placement.metrics import gpu_loads, imbalance, node_demand, predicted_metrics
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, balanced_class_shares
from scheduler.placement.step_time import LayerCost
from scheduler.placement.topology import Topology, load_topology
from scheduler.profile import ClassProfile, WorkloadProfile, save_profile

TOML = (
    "[cluster]\nnodes = {n}\ngpus_per_node = {g}\n\n"
    "[bandwidth]\nintra_node = 450\ninter_node = 50\n"
)


def make_profile(demand: np.ndarray, top_k: int = 2) -> WorkloadProfile:
    """demand [classes, layers, experts] -> a profile with classes c0, c1, ..."""
    classes, layers, experts = demand.shape
    model = ModelShape("toy", layers + 1, tuple(range(1, layers + 1)), experts, top_k, 16)
    total = demand.sum()
    return WorkloadProfile(
        model,
        {
            f"c{i}": ClassProfile(
                weight=float(demand[i].sum() / total), counts={"decode": demand[i].astype(float)}
            )
            for i in range(classes)
        },
    )


def test_topology_toml_and_errors(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(
        TOML.format(n=4, g=8) + "\n[links]\ncost = " + json.dumps((1 - np.eye(4)).tolist()) + "\n"
    )
    t = load_topology(path)
    assert (t.nodes, t.gpus_per_node, t.inter_node_gbps, t.num_gpus) == (4, 8, 50.0, 32)
    path.write_text(TOML.format(n=0, g=8))
    with pytest.raises(InputError, match="nodes must be >= 1"):
        load_topology(path)
    path.write_text("[cluster\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_topology(path)


def test_placement_maps_and_moves():
    p = Placement(np.array([[0, 1, 2, 3, 0, 1]]), 4, num_gpus=3, gpus_per_node=1)
    assert p.slots_per_gpu == 2 and p.gpu_of_slot().tolist() == [0, 0, 1, 1, 2, 2]
    assert p.replica_counts().tolist() == [[2, 2, 1, 1]]
    q = Placement(np.array([[1, 0, 2, 3, 3, 2]]), 4, 3, 1)
    assert q.moves_from(p) == 2  # GPU 2 needs 3 and 2
    with pytest.raises(ValueError, match="have no slot"):
        Placement(np.array([[0, 0, 1, 1]]), 4, 2, 1)
    with pytest.raises(ValueError, match="divisible"):
        Placement(np.array([[0, 1, 2, 3, 0]]), 4, 2, 1)


def test_sglang_json_round_trip_and_rejections():
    model = ModelShape("m", 3, (1, 2), 4, 2, 16)
    p = Placement(np.array([[3, 2, 1, 0], [0, 1, 2, 3]]), 4, 2, 1)
    data = to_sglang(p, model)
    assert list(data) == ["physical_to_logical_map"] and len(data["physical_to_logical_map"]) == 3
    back = from_sglang(data, model, 2, 1)
    assert np.array_equal(back.phy2log, p.phy2log)
    with pytest.raises(InputError, match="extra key"):
        from_sglang({**data, "note": 1}, model, 2, 1)
    bad = json.loads(json.dumps(data))
    bad["physical_to_logical_map"][1] = [0, 0, 1, 1]
    with pytest.raises(InputError, match=r"expert\(s\) \[2, 3\] have no slot"):
        from_sglang(bad, model, 2, 1)
    with pytest.raises(InputError, match="not divisible by the EP size 3"):
        from_sglang(data, model, 3, 1)
    with pytest.raises(InputError, match="one row per hidden layer"):
        from_sglang({"physical_to_logical_map": data["physical_to_logical_map"][1:]}, model, 2, 1)


def test_balanced_class_shares():
    shares = balanced_class_shares(np.array([0.5, 0.25, 0.25]), 4)
    assert np.allclose(shares.sum(axis=1), 1)
    assert np.allclose(np.array([0.5, 0.25, 0.25]) @ shares, 0.25)
    assert (shares > 0).sum(axis=1).tolist() == [2, 1, 1]


def _brute_force(demand, nodes, spg, tol):
    """Minimum remote demand over every one-layer placement (1 GPU per node, no
    redundancy) and every one-class-per-node assignment."""
    classes, _, experts = demand.shape
    best = np.inf
    for perm in itertools.permutations(range(experts)):
        row = np.array(perm)
        if any(
            list(row[i * spg : (i + 1) * spg]) != sorted(row[i * spg : (i + 1) * spg])
            for i in range(nodes)
        ):
            continue
        loads = [demand[:, 0, row[i * spg : (i + 1) * spg]].sum() for i in range(nodes)]
        if max(loads) > (1 + tol) * demand.sum() / nodes + 1e-9:
            continue
        for assign in itertools.permutations(range(nodes), classes):
            cost = sum(
                demand[c, 0].sum() - demand[c, 0, row[n * spg : (n + 1) * spg]].sum()
                for c, n in enumerate(assign)
            )
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ours_matches_brute_force_on_tiny_instances(seed):
    rng = np.random.default_rng(seed)
    demand = rng.integers(1, 50, size=(2, 1, 6)).astype(float)
    demand[:, :, :] += np.array([[[40, 40, 40, 0, 0, 0]], [[0, 0, 0, 40, 40, 40]]])
    profile = make_profile(demand)
    problem = PlacementProblem(
        profile, Topology(2, 1), balance_tolerance=0.5, time_limit_s=5, objective="remote-hits"
    )
    result = get_method("ours")(problem)
    assert result.status == "OPTIMAL"
    assert result.objective == pytest.approx(_brute_force(demand, 2, 3, 0.5), rel=1e-4)
    # certified given the class shares; the joint bound is below it
    assert result.details["conditional_bound"] == pytest.approx(result.objective, rel=1e-4)
    assert result.bound <= result.objective


@pytest.mark.parametrize("objective", ["time", "remote-hits"])
@pytest.mark.parametrize("seed, redundant", [(3, 0), (4, 4), (5, 8)])
def test_ours_invariants_on_random_instances(seed, redundant, objective):
    rng = np.random.default_rng(seed)
    demand = rng.gamma(3.0, 100, size=(3, 2, 8)) + 1
    problem = PlacementProblem(
        make_profile(demand),
        Topology(2, 2),
        redundant_experts=redundant,
        balance_tolerance=0.25,
        time_limit_s=4,
        seed=seed,
        objective=objective,
    )
    result = get_method("ours")(problem)
    p = result.placement
    assert p.phy2log.shape == (2, 8 + redundant) and p.slots_per_gpu == (8 + redundant) // 4
    assert (p.replica_counts() >= 1).all()
    assert np.allclose(result.class_to_node_share.sum(axis=1), 1)
    request_load = problem.weights @ result.class_to_node_share
    assert request_load.max() <= (1.25 + 1e-6) / 2
    if redundant == 0:  # the model is exact: GPU load balance holds as predicted
        loads = gpu_loads(node_demand(problem.demand, result.class_to_node_share), p)
        assert imbalance(loads).max() <= 1.25 + 1e-3
    trivial = get_method("trivial")(problem)
    ours_m = predicted_metrics(
        problem.demand,
        problem.weights,
        problem.profile.model,
        p,
        result.class_to_node_share,
        problem.topology,
    )
    triv_m = predicted_metrics(
        problem.demand,
        problem.weights,
        problem.profile.model,
        trivial.placement,
        trivial.class_to_node_share,
        problem.topology,
    )
    if objective == "remote-hits":
        assert ours_m["remote_hits_per_token_layer"] <= triv_m["remote_hits_per_token_layer"]
    else:  # what it minimises (trivial is one of its starts)
        cost = LayerCost.of(CostModel.from_topology(problem.topology), problem.profile.model)

        def objective(r):
            evals = evaluate_rows(problem, r.placement.phy2log, result.class_to_node_share, cost)
            return sum(e.objective for e in evals)

        assert objective(result) <= objective(trivial) + 1e-9


def test_unreachable_balance_is_relaxed_and_bad_shapes_say_the_fix():
    demand = np.ones((1, 1, 4))
    demand[0, 0, 0] = 100
    for objective in ("time", "remote-hits"):
        result = get_method("ours")(
            PlacementProblem(
                make_profile(demand),
                Topology(2, 1),
                balance_tolerance=0.0,
                time_limit_s=2,
                objective=objective,
            )
        )
        assert result.status == "BALANCE_RELAXED"
    with pytest.raises(ConfigError, match="equally over 3 GPUs"):
        PlacementProblem(make_profile(demand), Topology(3, 1))
    with pytest.raises(ConfigError, match="nodes must be >= 1"):
        Topology(0, 8)


def test_max_moves_zero_keeps_the_current_placement():
    rng = np.random.default_rng(7)
    demand = rng.gamma(0.5, 100, size=(2, 2, 8)) + 1
    profile = make_profile(demand)
    current = Placement.trivial(2, 8, 8, 4, 2)
    problem = PlacementProblem(
        profile, Topology(2, 2), balance_tolerance=2.0, time_limit_s=2, current=current, max_moves=0
    )
    result = get_method("ours")(problem)
    assert result.placement.moves_from(current) == 0


def test_place_cli_writes_and_checks(tmp_path, capsys):
    rng = np.random.default_rng(0)
    profile_path, topo = tmp_path / "p.json", tmp_path / "t.toml"
    save_profile(make_profile(rng.gamma(3.0, 100, size=(2, 2, 8)) + 1), profile_path)
    topo.write_text(TOML.format(n=2, g=2))
    out = tmp_path / "placement"
    args = ["place", "--profile", str(profile_path), "--topology", str(topo)]
    assert main([*args, "--out", str(out), "--time-limit", "2", "--balance-tolerance", "0.3"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["class_to_node_share"]) == {"c0", "c1"}
    assert {"objective", "bound", "gap", "predicted_metrics", "inputs"} <= set(plan)
    location = json.loads((out / "expert_location.json").read_text())
    assert list(location) == ["physical_to_logical_map"]
    assert len(location["physical_to_logical_map"]) == 3
    assert main([*args, "--check", str(out)]) == 0
    assert "valid placement" in capsys.readouterr().out

    def broken(mutate, message):
        data = json.loads(json.dumps(location))
        mutate(data)
        (out / "expert_location.json").write_text(json.dumps(data))
        assert main([*args, "--check", str(out)]) == 2
        assert message in capsys.readouterr().err

    broken(
        lambda d: (
            d["physical_to_logical_map"][1].__setitem__(0, 1)
            or d["physical_to_logical_map"][1].__setitem__(1, 1)
        ),
        "have no slot",
    )
    broken(
        lambda d: d["physical_to_logical_map"].__setitem__(1, d["physical_to_logical_map"][1][:6]),
        "differ in width",
    )
    broken(
        lambda d: [row.extend([0, 1]) for row in d["physical_to_logical_map"]],
        "not divisible by the EP size 4",
    )
    broken(lambda d: d.update(extra=1), "extra key")
