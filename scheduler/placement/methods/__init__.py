"""Placement methods, chosen by name (``--method``).

Every method is ``solve(problem: PlacementProblem) -> PlacementResult``. Peers are
written here from their published descriptions (see docs/placement.md).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from scheduler.errors import ConfigError
from scheduler.placement.problem import PlacementProblem, PlacementResult

Method = Callable[[PlacementProblem], PlacementResult]

#: name -> (module, function, one-line description)
METHODS: dict[str, tuple[str, str, str]] = {
    "ours": (
        "ours_time",
        "solve",
        "joint class shares and placement minimising modelled MoE-layer time (--objective)",
    ),
    "ours-remote-hits": (
        "ours",
        "solve_remote_hits",
        "ours with --objective remote-hits (CP-SAT per layer), kept for comparison",
    ),
    "trivial": ("trivial", "solve", "SGLang's default: slot p holds expert p mod E"),
    "eplb": ("eplb", "solve_global", "DeepSeek EPLB, global policy (SGLang `deepseek`)"),
    "eplb-hierarchical": (
        "eplb",
        "solve_hierarchical",
        "DeepSeek EPLB, groups to nodes first (SGLang `deepseek_hierarchical`)",
    ),
    "paper-a": ("paper_a", "solve", "paper A: traffic-weighted topology ILP per layer"),
    "moetuner": ("moetuner", "solve", "MoETuner: balanced-clustering ILP + cluster-to-GPU ILP"),
    "paper-b": ("paper_b", "solve", "paper B: request groups to nodes, greedy U[d,e] placement"),
}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    """The solve function of method ``name``; ConfigError naming the choices if unknown."""
    if name not in METHODS:
        raise ConfigError(f"unknown --method {name!r}; choose one of: {', '.join(METHODS)}")
    module, function, _ = METHODS[name]
    solve: Method = getattr(import_module(f"{__name__}.{module}"), function)
    return solve
