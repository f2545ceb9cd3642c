"""Static dispatch against SGLang's own replica choice.

Where SGLang's choice is deterministic (own GPU, then the lowest slot on the node when
the node narrows the choice) the table must agree cell for cell; where it is random
(no replica on the node, or every replica on it) it must deal the replicas as fairly as
SGLang's ``_fair_choices`` does. With the sglang package installed
(``pip install --no-deps sglang==0.5.23``) the test runs SGLang's own functions, read
from its source file; without it, a table computed with them is pinned below.
"""

from __future__ import annotations

import ast
import importlib.util
import typing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scheduler.accounting import static_dispatch_table
from scheduler.placement.placement import Placement

SOURCE = Path("srt", "eplb", "expert_location.py")
FUNCTIONS = (
    "_find_nearest_expert",
    "_compute_gpu_id_of_physical_expert",
    "_compute_node_id_of_physical_expert",
)

#: 2 nodes x 3 GPUs, 2 slots per GPU, one layer of 6 experts.
PINNED_PHY2LOG = [0, 1, 2, 0, 3, 4, 1, 5, 0, 2, 5, 1]
#: SGLang 0.5.23's ``_find_nearest_expert`` on it, as the GPU of the slot it returns, per
#: [rank][expert]; -1 where it returns -1 (the fair random choice decides).
PINNED_NEAREST_GPU = [
    [0, 0, 1, 2, 2, -1],
    [1, 0, 1, 2, 2, -1],
    [0, 0, 1, 2, 2, -1],
    [4, 3, 4, 2, 2, 3],
    [4, 3, 4, 2, 2, -1],
    [4, 5, 4, 2, 2, 5],
]


def _sglang_functions() -> SimpleNamespace | None:
    """SGLang's pure dispatch helpers, compiled from its source (importing the module
    would need a GPU stack), or None when sglang is not installed."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), SOURCE)
    if not path.is_file():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    body: list[ast.stmt] = [
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS
    ]
    if len(body) != len(FUNCTIONS):
        return None
    namespace: dict[str, typing.Any] = {"List": list, "Optional": typing.Optional}
    exec(compile(ast.Module(body, []), str(path), "exec"), namespace)  # noqa: S102
    return SimpleNamespace(**{name.lstrip("_"): namespace[name] for name in FUNCTIONS})


def _nearest_gpus(placement: Placement, sglang: SimpleNamespace) -> np.ndarray:
    """[ranks, layers, experts]: the GPU SGLang's deterministic steps pick, -1 where its
    fair random choice decides."""
    per_gpu, per_node = placement.slots_per_gpu, placement.gpus_per_node
    out = np.full((placement.num_gpus, placement.num_layers, placement.num_experts), -1)
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            slots = np.flatnonzero(placement.phy2log[layer] == expert).tolist()
            for rank in range(placement.num_gpus):
                slot = sglang.find_nearest_expert(
                    slots, per_gpu, rank, per_node, per_gpu * per_node
                )
                if slot != -1:
                    out[rank, layer, expert] = slot // per_gpu
    return out


def _check(placement: Placement, nearest: np.ndarray) -> None:
    dest = static_dispatch_table(placement)
    decided = nearest >= 0
    assert (dest[decided] == nearest[decided]).all()
    gpu_of = placement.gpu_of_slot()
    for layer in range(placement.num_layers):
        for expert in range(placement.num_experts):
            undecided = np.flatnonzero(~decided[:, layer, expert])
            slots = np.flatnonzero(placement.phy2log[layer] == expert)
            replica_gpus = gpu_of[slots]
            chosen = dest[undecided, layer, expert]
            assert np.isin(chosen, replica_gpus).all()
            # Fair dealing: every replica gets floor or ceil of undecided / replicas.
            dealt = [(chosen == g).sum() for g in replica_gpus]
            per_gpu = np.bincount(replica_gpus, minlength=placement.num_gpus)[replica_gpus]
            share = np.array(dealt) / per_gpu  # a GPU with two replicas is dealt twice
            assert share.max() - share.min() <= 1 + 1e-9


def test_pinned_table_from_sglang() -> None:
    placement = Placement(np.array([PINNED_PHY2LOG]), 6, 6, 3)
    _check(placement, np.array(PINNED_NEAREST_GPU)[:, None, :])


def test_pinned_table_is_what_sglang_computes() -> None:
    sglang = _sglang_functions()
    if sglang is None:
        pytest.skip("sglang is not installed; `pip install --no-deps sglang==0.5.23`")
    placement = Placement(np.array([PINNED_PHY2LOG]), 6, 6, 3)
    assert _nearest_gpus(placement, sglang)[:, 0, :].tolist() == PINNED_NEAREST_GPU


@pytest.mark.parametrize("seed", range(12))
def test_agrees_with_sglang_on_random_placements(seed: int) -> None:
    sglang = _sglang_functions()
    if sglang is None:
        pytest.skip("sglang is not installed; `pip install --no-deps sglang==0.5.23`")
    rng = np.random.default_rng(seed)
    nodes, per_node = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    gpus, experts, layers = nodes * per_node, int(rng.integers(2, 12)), 3
    slots = gpus * max(1, -(-experts // gpus) + int(rng.integers(0, 3)))
    phy2log = np.array(
        [
            rng.permutation(np.r_[np.arange(experts), rng.integers(0, experts, slots - experts)])
            for _ in range(layers)
        ]
    )
    placement = Placement(phy2log, experts, gpus, per_node)
    _check(placement, _nearest_gpus(placement, sglang))


def test_lowest_slot_on_the_node_not_the_next_gpu() -> None:
    # 2 nodes x 4 GPUs, one slot each; expert 0 on GPUs 1, 3 and 6. Node 0 holds two of
    # three replicas: its ranks 0 and 2 take the lowest slot (GPU 1), not the next GPU.
    phy2log = np.array([[1, 0, 2, 0, 3, 4, 0, 5]])
    dest = static_dispatch_table(Placement(phy2log, 6, 8, 4))
    assert dest[:4, 0, 0].tolist() == [1, 1, 1, 3]
    assert dest[4:, 0, 0].tolist() == [6, 6, 6, 6]


def test_table_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    phy2log = np.array([rng.permutation(np.r_[np.arange(16), np.arange(16)]) for _ in range(4)])
    placement = Placement(phy2log, 16, 8, 4)
    assert (static_dispatch_table(placement) == static_dispatch_table(placement)).all()
