"""Our numpy EPLB against SGLang's own ``rebalance_experts`` (the installed sglang wheel),
and against the output deepseek-ai/EPLB's README publishes for its example (no torch).

SGLang's algorithm module ``sglang/srt/eplb/eplb_algorithms/deepseek.py`` imports only
torch, so it is loaded by file path; the ``sglang`` package itself (CUDA-only
dependencies) is never imported. Install for this test: ``pip install torch==2.13.0``
(CPU) and ``pip install --no-deps sglang==0.5.23``.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from scheduler.placement.methods.eplb import rebalance_experts

ALGORITHM = Path("srt", "eplb", "eplb_algorithms", "deepseek.py")
STATS = Path("traces", "sglang-deepseek-v3-eplb-stats")


@pytest.fixture(scope="module")
def sglang_eplb() -> ModuleType:
    torch = pytest.importorskip("torch", reason="torch is needed to run SGLang's EPLB")
    spec = importlib.util.find_spec("sglang")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "sglang is not installed; `pip install --no-deps sglang==0.5.23` to compare "
            "our EPLB with SGLang's"
        )
    path = Path(next(iter(spec.submodule_search_locations)), ALGORITHM)
    if not path.is_file():
        pytest.skip(f"this sglang has no {ALGORITHM} (checked against sglang 0.5.23)")
    module_spec = importlib.util.spec_from_file_location("_sglang_eplb_deepseek", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.set_num_threads(1)
    return module


def compare(
    theirs: ModuleType,
    logical_count: list[list[float]] | np.ndarray,
    replicas: int,
    groups: int,
    nodes: int,
    gpus: int,
    hierarchical: bool,
) -> None:
    """Both algorithms on the same statistics; SGLang builds its tensor as init_by_eplb
    does (``torch.tensor`` of the loaded list: float32), we take float64 arrays."""
    import torch

    weight = torch.tensor(np.asarray(logical_count).tolist()).unsqueeze(0).sum(dim=0)
    expected = theirs.rebalance_experts(weight, replicas, groups, nodes, gpus, hierarchical)
    got = rebalance_experts(
        np.asarray(logical_count, dtype=np.float64), replicas, groups, nodes, gpus, hierarchical
    )
    for name, want, have in zip(("phy2log", "log2phy", "logcnt"), expected, got, strict=True):
        assert have.dtype == np.int64, name
        np.testing.assert_array_equal(have, want.numpy(), err_msg=name)


#: (redundant experts, nodes, GPUs per node) on DeepSeek-V3's 256 experts, 8 groups.
REAL_CASES = [
    (red, nodes, gpn, hier)
    for hier, red, (nodes, gpn) in itertools.product((False, True), (0, 32), ((4, 8), (32, 8)))
    if (256 + red) % (nodes * gpn) == 0 and not (hier and 8 % nodes)
]


def test_real_deepseek_v3_statistics(sglang_eplb, shared_data):
    """All 12 recorded workloads, all 61 rows (dense ones included, as SGLang gets them)."""
    files = sorted((shared_data / STATS).glob("*.json"))
    assert len(files) == 12
    compared = 0
    for path in files:
        logical_count = json.loads(path.read_text())["logical_count"]
        for red, nodes, gpn, hier in REAL_CASES:
            compare(sglang_eplb, logical_count, 256 + red, 8, nodes, nodes * gpn, hier)
            compared += 1
        # Our method sees the MoE rows only; rows are independent, so they match too.
        moe = rebalance_experts(np.asarray(logical_count)[3:], 288, 8, 4, 32, True)[0]
        full = rebalance_experts(np.asarray(logical_count), 288, 8, 4, 32, True)[0]
        np.testing.assert_array_equal(moe, full[3:])
    assert compared == 12 * len(REAL_CASES) == 60


def test_small_random_instances(sglang_eplb):
    """Ties galore (small integer loads, zero rows) over varied shapes and policies."""
    rng = np.random.default_rng(0)
    shapes = [  # experts, groups, nodes, gpus, replicas
        (12, 4, 2, 8, 16),  # the shape of deepseek-ai/EPLB's README example (below)
        (16, 4, 2, 4, 16),
        (16, 4, 4, 8, 24),
        (32, 8, 2, 4, 40),
        (64, 8, 4, 16, 80),
        (24, 6, 3, 6, 36),
        (20, 5, 1, 5, 25),
    ]
    for (experts, groups, nodes, gpus, replicas), hier in itertools.product(shapes, (False, True)):
        for high in (1, 3, 1000):
            weight = rng.integers(0, high + 1, size=(5, experts)).astype(np.float64)
            weight[0] = 0
            compare(sglang_eplb, weight, replicas, groups, nodes, gpus, hier)
    compare(sglang_eplb, README_WEIGHT, 16, 4, 2, 8, True)


#: deepseek-ai/EPLB's README example ("Interface and Example",
#: https://github.com/deepseek-ai/EPLB/blob/main/README.md): a two-layer MoE with 12
#: experts per layer, 16 replicas on 2 nodes of 4 GPUs, 4 expert groups.
README_WEIGHT = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
#: The phy2log the README prints for it (hierarchical policy, since 4 groups % 2 nodes == 0).
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


@pytest.mark.parametrize("hierarchical", [None, True])
def test_readme_example_output(hierarchical):
    """EPLB's own published example, pinned without torch or sglang: our phy2log is the
    README's, under EPLB's default policy choice (None) and explicitly hierarchical."""
    phy2log, log2phy, logcnt = rebalance_experts(
        np.asarray(README_WEIGHT, dtype=np.float64), 16, 4, 2, 8, hierarchical
    )
    assert phy2log.tolist() == README_PHY2LOG
    # the other two outputs follow from it: replica counts, and where each replica sits
    counts = np.stack([np.bincount(row, minlength=12) for row in phy2log])
    np.testing.assert_array_equal(logcnt, counts)
    for layer, row in enumerate(phy2log):
        for expert in range(12):
            slots = log2phy[layer, expert]
            assert sorted(slots[slots >= 0].tolist()) == np.flatnonzero(row == expert).tolist()
