"""``--init-expert-location`` for the emulator, and which replica a rank's tokens reach.

The placement itself is :class:`scheduler.placement.Placement` (``phy2log [moe_layers,
slots]``), read and validated by :mod:`scheduler.placement.io` exactly as the ``place``
command writes it. DP-attention rank ``r`` sits on GPU ``r`` (attention TP size 1).

Static dispatch (sglang-integration.md §1.3): a token on rank ``r`` reaches a logical
expert through its replica on GPU ``r`` if there is one, else one on ``r``'s node if there
is one, else a fixed replica on another node. Only the locality of the reached replica
matters here, and it does not depend on which remote replica is fixed.

Pure, apart from :func:`load_expert_location` reading the JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape
from scheduler.placement import Placement
from scheduler.placement.io import from_sglang, read_sglang_file

#: Locality of the replica a token reaches (values of :func:`dispatch_locality`).
SAME_GPU, SAME_NODE, OTHER_NODE = 0, 1, 2
INLINE = "inline JSON"


def trivial_location(
    model: ModelShape, num_gpus: int, gpus_per_node: int, redundant: int = 0
) -> Placement:
    """SGLang's ``trivial`` placement: slot ``p`` holds expert ``p % num_experts``."""
    slots = model.num_experts + redundant
    if redundant < 0 or slots % num_gpus:
        raise InputError(
            "trivial",
            f"{model.num_experts} experts + {redundant} redundant = {slots} slots, "
            f"not divisible by {num_gpus} GPUs (choose --ep-num-redundant-experts so it is)",
        )
    return Placement.trivial(
        model.num_moe_layers, model.num_experts, slots, num_gpus, gpus_per_node
    )


def load_expert_location(
    spec: str, model: ModelShape, num_gpus: int, gpus_per_node: int
) -> Placement:
    """``--init-expert-location`` other than ``trivial``: a ``.json`` file, or inline JSON
    (``{...}``) as SGLang also accepts. Raises :class:`InputError` naming the file."""
    if spec.lstrip().startswith("{"):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as e:
            raise InputError(INLINE, f"not valid JSON ({e.msg})") from None
        return from_sglang(data, model, num_gpus, gpus_per_node, Path(INLINE))
    path = Path(spec)
    if path.suffix == ".pt":
        raise InputError(path, ".pt placements need torch; save the map as JSON instead")
    return read_sglang_file(path, model, num_gpus, gpus_per_node)


def dispatch_locality(placement: Placement) -> np.ndarray:
    """[ranks, moe_layers, experts] int8: locality of the replica rank r's tokens reach.

    ``SAME_GPU`` (0), ``SAME_NODE`` (1) or ``OTHER_NODE`` (2), by SGLang's static dispatch.
    """
    on_gpu = placement.replicas_per_gpu() > 0  # [L, E, gpus]
    on_node = placement.replicas_per_node() > 0  # [L, E, nodes]
    node_of_rank = np.arange(placement.num_gpus) // placement.gpus_per_node
    same_gpu = on_gpu.transpose(2, 0, 1)  # [ranks, L, E]
    same_node = on_node[:, :, node_of_rank].transpose(2, 0, 1)
    out = np.full(same_gpu.shape, OTHER_NODE, dtype=np.int8)
    out[same_node] = SAME_NODE
    out[same_gpu] = SAME_GPU
    return out
