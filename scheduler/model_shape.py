"""The shape of an MoE model, as far as routing is concerned.

Pure: no I/O beyond reading a JSON file in :func:`resolve_model`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError, InputError


@dataclass(frozen=True)
class ModelShape:
    """Routing-relevant shape of an MoE model.

    ``moe_layer_ids`` are model layer numbers (0-based, in ``[0, num_hidden_layers)``) of
    the MoE layers, in increasing order; index ``j`` of every ``[layers, ...]`` array in
    this package is MoE layer ``moe_layer_ids[j]``. Dense layers carry no routing.
    ``moe_intermediate_size`` (optional; the HF config key of the same name): the routed
    experts' FFN width, which sets their weight bytes and FLOPs in the cost model; it
    does not take part in shape comparisons (a trace recorded without it still matches).
    """

    name: str
    num_hidden_layers: int
    moe_layer_ids: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.moe_intermediate_size is not None and not (
            isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size >= 1
        ):
            problems.append(
                f"moe_intermediate_size must be an integer >= 1, got {self.moe_intermediate_size}"
            )
        if self.num_hidden_layers < 1:
            problems.append(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if not self.moe_layer_ids:
            problems.append("moe_layer_ids must list at least one layer")
        elif list(self.moe_layer_ids) != sorted(set(self.moe_layer_ids)):
            problems.append("moe_layer_ids must be strictly increasing")
        elif self.moe_layer_ids[0] < 0 or self.moe_layer_ids[-1] >= self.num_hidden_layers:
            problems.append(
                f"moe_layer_ids must lie in [0, {self.num_hidden_layers}), "
                f"got {self.moe_layer_ids[0]}..{self.moe_layer_ids[-1]}"
            )
        if self.num_experts < 1:
            problems.append(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= max(self.num_experts, 1):
            problems.append(f"top_k must be in [1, num_experts], got {self.top_k}")
        if self.hidden_size < 1:
            problems.append(f"hidden_size must be >= 1, got {self.hidden_size}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str | Path | None = None) -> ModelShape:
        """Build from the ``model`` object of a profile or trace manifest.

        Raises :class:`InputError` naming ``source`` and the bad field.
        """
        if not isinstance(d, dict):
            raise InputError(source, "'model' must be a JSON object")
        try:
            ids = d["moe_layer_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise InputError(source, "model.moe_layer_ids must be a list of integers")
            ints = {}
            for key in ("num_hidden_layers", "num_experts", "top_k", "hidden_size"):
                value = d[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise InputError(source, f"model.{key} must be an integer, got {value!r}")
                ints[key] = value
            width = d.get("moe_intermediate_size")
            if width is not None and (not isinstance(width, int) or isinstance(width, bool)):
                raise InputError(
                    source, f"model.moe_intermediate_size must be an integer, got {width!r}"
                )
            return cls(
                moe_intermediate_size=width,
                name=str(d.get("name", "unnamed")),
                moe_layer_ids=tuple(ids),
                **ints,
            )
        except KeyError as e:
            raise InputError(source, f"model is missing the key {e.args[0]!r}") from e
        except ValueError as e:
            raise InputError(source, f"invalid model shape: {e}") from e


def _dense_prefix(
    name: str, layers: int, dense: int, experts: int, top_k: int, hidden: int, width: int
) -> ModelShape:
    return ModelShape(name, layers, tuple(range(dense, layers)), experts, top_k, hidden, width)


#: Shapes of models we have traces for or target. Routed experts only (shared experts
#: are always on and never routed). Sources: the models' HF configs.
PRESETS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        _dense_prefix("deepseek-v3", 61, 3, 256, 8, 7168, 2048),
        _dense_prefix("deepseek-v2-lite", 27, 1, 64, 6, 2048, 1408),
        _dense_prefix("mixtral-8x7b", 32, 0, 8, 2, 4096, 14336),
        _dense_prefix("qwen3-235b-a22b", 94, 0, 128, 8, 4096, 1536),
    )
}


def resolve_model(spec: str) -> ModelShape:
    """A preset name (see :data:`PRESETS`) or the path of a JSON file with the model keys."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.exists():
        raise ConfigError(
            f"--model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor an existing JSON file"
        )
    from scheduler.jsonio import read_json

    data = read_json(path)
    return ModelShape.from_dict(data.get("model", data) if isinstance(data, dict) else data, path)
