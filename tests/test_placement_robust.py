"""``place --method ours`` on the shapes real models have: hot experts, top-1, expert
counts that need redundancy to divide, Mixtral's 8 experts, 256 experts on 256 GPUs.
Every placement must be valid for SGLang, hold every expert, and be within the balance
tolerance or marked BALANCE_RELAXED with the imbalance it reached."""

import itertools

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.errors import ConfigError
from scheduler.model_shape import ModelShape
from scheduler.placement.joint_bound import joint_bound
from scheduler.placement.methods import get_method
from scheduler.placement.methods.ours_time import evaluate_rows
from scheduler.placement.problem import PlacementProblem
from scheduler.placement.step_time import LayerCost, LayerState, OperatingPoint
from scheduler.placement.topology import Topology
from scheduler.profile import ClassProfile, WorkloadProfile, save_profile


def profile_of(demand: np.ndarray, top_k: int, dense: int = 1) -> WorkloadProfile:
    """demand [classes, layers, experts] -> a profile; ``dense`` leading dense layers."""
    classes, layers, experts = demand.shape
    model = ModelShape(
        "shape", layers + dense, tuple(range(dense, layers + dense)), experts, top_k, 64, 32
    )
    weights = demand.sum(axis=(1, 2))
    return WorkloadProfile(
        model,
        {
            f"c{i}": ClassProfile(float(weights[i] / weights.sum()), {"decode": demand[i]})
            for i in range(classes)
        },
    )


def hot_demand(classes: int, layers: int, experts: int, share: float, rng) -> np.ndarray:
    """Layer 0 sends ``share`` of its picks to expert 0; the other layers are skewed."""
    demand = rng.gamma(0.7, 100.0, size=(classes, layers, experts)) + 1.0
    rest = demand[:, 0, 1:].sum(axis=1)
    demand[:, 0, 0] = rest * share / (1 - share)
    return demand


def check(problem: PlacementProblem, method: str = "ours"):
    result = get_method(method)(problem)
    p = result.placement
    m = problem.profile.model
    assert p.phy2log.shape == (m.num_moe_layers, problem.num_slots)
    assert (p.replica_counts() >= 1).all(), "every expert must keep a replica"
    assert np.allclose(result.class_to_node_share.sum(axis=1), 1)
    evals = evaluate_rows(
        problem,
        p.phy2log,
        result.class_to_node_share,
        LayerCost.of(_cost(problem), m),
    )
    over = [
        e.max_load / e.mean_load
        for e in evals
        if e.mean_load > 0 and e.max_load > (1 + problem.balance_tolerance + 2e-3) * e.mean_load
    ]
    if result.status == "BALANCE_RELAXED":
        reported = result.details["balance_relaxed"]
        assert reported["tolerance"] == problem.balance_tolerance
    else:
        assert not over, f"{result.status} but {len(over)} layer(s) above the tolerance"
    if result.bound is not None and result.objective is not None:
        assert result.bound <= result.objective + 1e-6
    return result, evals


def _cost(problem):
    from scheduler.accounting.cost_model import CostModel

    return CostModel.from_topology(problem.topology)


@pytest.mark.parametrize("redundant", [0, 8])
def test_one_expert_with_99_percent_of_a_layer(redundant):
    rng = np.random.default_rng(0)
    demand = hot_demand(2, 3, 16, 0.995, rng)
    problem = PlacementProblem(
        profile_of(demand, top_k=1), Topology(2, 2), redundant_experts=redundant, time_limit_s=2
    )
    result, evals = check(problem)
    hot = result.placement.replica_counts()[0, 0]
    if redundant:
        # the hot expert is split over every GPU, several replicas per node
        assert hot >= problem.topology.num_gpus
        assert result.placement.replicas_per_node()[0, 0].max() >= 2
    else:
        assert result.status == "BALANCE_RELAXED"  # one slot cannot be split
        layer0 = result.details["balance_relaxed"]["gpu_load_imbalance_by_layer"][0]
        assert layer0 > 3


def test_hot_expert_more_redundancy_balances_better():
    rng = np.random.default_rng(1)
    demand = hot_demand(1, 2, 16, 0.9, rng)
    imbalance = []
    for redundant in (0, 4, 16):
        problem = PlacementProblem(
            profile_of(demand, 2), Topology(2, 2), redundant_experts=redundant, time_limit_s=2
        )
        _, evals = check(problem)
        imbalance.append(evals[0].max_load / evals[0].mean_load)
    # one slot cannot split a 90 % expert; 4 or 16 spare slots bring it within +10 %
    assert imbalance[0] > 1.1 + 2e-3 >= max(imbalance[1:])


def test_remote_hits_objective_relaxes_instead_of_refusing():
    rng = np.random.default_rng(2)
    demand = hot_demand(2, 2, 8, 0.99, rng)
    problem = PlacementProblem(
        profile_of(demand, 1), Topology(2, 1), time_limit_s=2, objective="remote-hits"
    )
    result, _ = check(problem)
    assert result.status == "BALANCE_RELAXED"
    assert result.details["conditional_bound_scope"].startswith("sum of per-layer")


@pytest.mark.parametrize(
    "experts, top_k, nodes, gpus, redundant, layers",
    [
        (128, 1, 2, 2, 0, 3),  # top-1, many experts
        (60, 4, 4, 2, 4, 2),  # 60 experts on 8 GPUs: 4 redundant so slots divide
        (8, 2, 2, 4, 0, 3),  # Mixtral: one expert per GPU
        (256, 8, 32, 8, 0, 1),  # 256 experts on 256 GPUs
    ],
)
def test_real_model_shapes(experts, top_k, nodes, gpus, redundant, layers):
    rng = np.random.default_rng(experts)
    demand = rng.gamma(0.5, 50.0, size=(3, layers, experts)) + 0.1
    problem = PlacementProblem(
        profile_of(demand, top_k, dense=2),
        Topology(nodes, gpus),
        redundant_experts=redundant,
        balance_tolerance=0.25,
        time_limit_s=3,
    )
    check(problem)


def test_invalid_input_names_the_fix():
    demand = np.ones((1, 1, 60))
    with pytest.raises(ConfigError, match="redundant-experts so that the total is a multiple of 8"):
        PlacementProblem(profile_of(demand, 2), Topology(4, 2))
    with pytest.raises(ConfigError, match="--objective"):
        PlacementProblem(profile_of(demand, 2), Topology(2, 2), objective="speed")
    with pytest.raises(ConfigError, match="--tokens-per-rank"):
        OperatingPoint("decode", 0)
    with pytest.raises(ConfigError, match="--phase"):
        OperatingPoint("train", 8)


def _all_rows(experts: int, slots: int):
    """Every row of ``slots`` with each expert at least once."""
    for row in itertools.product(range(experts), repeat=slots):
        if len(set(row)) == experts:
            yield np.array(row)


@pytest.mark.parametrize("seed", [0, 1])
def test_time_objective_matches_brute_force_on_a_tiny_instance(seed):
    """One class (the shares cannot matter), 4 experts + 2 redundant on 2x1 GPUs: the
    search reaches the best of all 4,000-odd rows under its own objective."""
    rng = np.random.default_rng(seed)
    demand = rng.gamma(0.6, 100.0, size=(1, 1, 4)) + 1
    problem = PlacementProblem(
        profile_of(demand, 2),
        Topology(2, 1),
        redundant_experts=2,
        balance_tolerance=0.5,
        time_limit_s=2,
        seed=seed,
    )
    result = get_method("ours")(problem)
    m = problem.profile.model
    cost = LayerCost.of(_cost(problem), m)
    shares = np.ones((1, 2)) / 2

    def objective(row):
        from scheduler.placement.step_time import node_operating_point

        pc, mix, tokens = node_operating_point(problem.demand, problem.weights, shares, 2, 128)
        state = LayerState(pc[:, 0], mix, tokens, row, 3, 1, 2, cost)
        return state.evaluate(tolerance=0.5).objective

    best = min(objective(row) for row in _all_rows(4, 6))
    assert objective(result.placement.phy2log[0]) == pytest.approx(best, rel=1e-6)


def test_joint_bound_is_below_every_method():
    rng = np.random.default_rng(3)
    demand = rng.gamma(0.5, 100.0, size=(3, 2, 16)) + 1
    problem = PlacementProblem(profile_of(demand, 2), Topology(2, 2), time_limit_s=2)
    cost = LayerCost.of(_cost(problem), problem.profile.model)
    bound = joint_bound(problem, cost)
    assert bound.method.startswith("LP")  # small enough for the LP
    for method in ("trivial", "eplb", "paper-b", "ours"):
        result = get_method(method)(problem)
        evals = evaluate_rows(problem, result.placement.phy2log, result.class_to_node_share, cost)
        assert bound.time_us <= min(e.time_us for e in evals) + 1e-9


def test_place_cli_reports_a_relaxed_balance(tmp_path, capsys):
    rng = np.random.default_rng(4)
    demand = hot_demand(1, 2, 8, 0.999, rng)
    save_profile(profile_of(demand, 1), tmp_path / "profile.json")
    (tmp_path / "topo.toml").write_text("[cluster]\nnodes = 2\ngpus_per_node = 2\n")
    code = main(
        [
            "place",
            "--profile",
            str(tmp_path / "profile.json"),
            "--topology",
            str(tmp_path / "topo.toml"),
            "--out",
            str(tmp_path / "plan"),
            "--time-limit",
            "2",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "BALANCE_RELAXED" in err and "layer 0" in err
    import json

    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["solver"]["status"] == "BALANCE_RELAXED"
    assert plan["predicted_metrics"]["operating_point"] == {
        "phase": "decode",
        "tokens_per_rank": 128,
    }
    assert plan["gap"] is not None


@pytest.mark.parametrize(
    "name, objective, redundant",
    [
        ("mixtral-humaneval-gsm8k-small", "time", "8"),
        ("mixtral-humaneval-gsm8k-small", "remote-hits", "8"),
        ("sglang-deepseek-v3-eplb-stats", "time", "0"),
    ],
)
def test_place_on_real_trace_sets(shared_data, tmp_path, name, objective, redundant, capsys):
    """Profiles the project builds from its data place (the Mixtral set once crashed the
    locality heuristic with 8 redundant slots on 4x2 GPUs; ESFT is placed elsewhere)."""
    topo = tmp_path / "4x2.toml"
    topo.write_text("[cluster]\nnodes = 4\ngpus_per_node = 2\n")
    store, profile, out = tmp_path / "store", tmp_path / "profile.json", tmp_path / "plan"
    assert main(["import", str(shared_data / "traces" / name), "--out", str(store)]) == 0
    assert main(["profile", str(store), "--by", "label", "--out", str(profile)]) == 0
    args = ["place", "--profile", str(profile), "--topology", str(topo)]
    args += ["--redundant-experts", redundant, "--time-limit", "1"]
    assert main([*args, "--objective", objective, "--out", str(out)]) == 0
    if name.startswith("mixtral"):
        # Placed fine, but SGLang's Mixtral class takes no placement: --check refuses it.
        assert main([*args, "--check", str(out)]) == 2
        assert "no get_model_config_for_expert_location" in capsys.readouterr().err
    else:
        assert main([*args, "--check", str(out)]) == 0
    capsys.readouterr()
