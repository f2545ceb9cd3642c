import json

import pytest

from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import PRESETS, ModelShape, resolve_model


def test_presets_match_the_real_models():
    v3 = PRESETS["deepseek-v3"]
    assert (v3.num_hidden_layers, v3.num_moe_layers, v3.num_experts, v3.top_k) == (61, 58, 256, 8)
    assert v3.moe_layer_ids[0] == 3 and v3.moe_layer_ids[-1] == 60
    lite = PRESETS["deepseek-v2-lite"]
    assert (lite.num_moe_layers, lite.num_experts, lite.top_k) == (26, 64, 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"moe_layer_ids": ()}, "at least one"),
        ({"moe_layer_ids": (2, 1)}, "strictly increasing"),
        ({"moe_layer_ids": (1, 4)}, "must lie in"),
        ({"top_k": 9}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
    ],
)
def test_invalid_shapes_are_rejected(kwargs, message):
    base = {
        "name": "m",
        "num_hidden_layers": 4,
        "moe_layer_ids": (1, 2, 3),
        "num_experts": 8,
        "top_k": 2,
        "hidden_size": 16,
    }
    with pytest.raises(ValueError, match=message):
        ModelShape(**{**base, **kwargs})


def test_resolve_model_from_file(tmp_path, tiny_model):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(tiny_model.to_dict()))
    assert resolve_model(str(path)) == tiny_model


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        resolve_model(str(bad))
    bad.write_text(json.dumps({"name": "x", "num_hidden_layers": 2}))
    with pytest.raises(InputError, match="missing the key"):
        resolve_model(str(bad))
