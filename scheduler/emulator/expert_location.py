"""``--init-expert-location`` for the emulator.

The placement itself is :class:`scheduler.placement.Placement` (``phy2log [moe_layers,
slots]``), read and validated by :mod:`scheduler.placement.io` exactly as the ``place``
command writes it. DP-attention rank ``r`` sits on GPU ``r`` (attention TP size 1).
Which replica a rank's tokens reach is SGLang's static dispatch, modelled once for the
whole project by :func:`scheduler.accounting.static_dispatch_table`.

Pure, apart from :func:`load_expert_location` reading the JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape
from scheduler.placement import Placement
from scheduler.placement.io import from_sglang, read_sglang_file

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
            raise InputError(INLINE, f"not valid JSON ({e.msg})") from e
        return from_sglang(data, model, num_gpus, gpus_per_node, Path(INLINE))
    path = Path(spec)
    if path.suffix == ".pt":
        raise InputError(path, ".pt placements need torch; save the map as JSON instead")
    return read_sglang_file(path, model, num_gpus, gpus_per_node)
