"""``moe-scheduler sglang-args``: the SGLang launch commands, checked against the facts of
docs/sglang-versions.md (flag names, node ranks, DP-rank layout, version switch, redundant
experts, models SGLang cannot place, recorder modes under DeepEP) and against bad inputs.
Every checked version's own argparse table: tests/test_sglang_versions.py."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scheduler.cli import main
from scheduler.deploy.sglang_args import (
    LAUNCH_PREFIX,
    SglangLaunch,
    SglangVersion,
    all_node_argv,
    node_argv,
    node_of_dp_rank,
    render_shell,
)
from scheduler.errors import ConfigError
from scheduler.jsonio import write_json_atomic
from scheduler.model_shape import PRESETS, ModelShape
from scheduler.placement.io import to_sglang
from scheduler.placement.placement import Placement

MODEL = PRESETS["deepseek-v2-lite"]  # 64 experts, 27 hidden layers


def launch(**kw: object) -> SglangLaunch:
    values: dict[str, object] = dict(
        model_path="deepseek-ai/DeepSeek-V2-Lite",
        nodes=2,
        gpus_per_node=8,
        num_experts=64,
        num_slots=80,
        expert_location="/p/expert_location.json",
        dist_init_addr="10.0.0.1:5000",
    )
    values.update(kw)
    return SglangLaunch(**values)  # type: ignore[arg-type]


def flags(argv: list[str]) -> dict[str, str | None]:
    """--flag -> value (None for a switch); the launch prefix skipped."""
    out: dict[str, str | None] = {}
    rest = argv[len(LAUNCH_PREFIX) :]
    for i, arg in enumerate(rest):
        if arg.startswith("--"):
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


# ----------------------------------------------------------------------------- argv


def test_every_node_gets_the_flags_of_sglang_0_5_23():
    spec = launch()
    commands = all_node_argv(spec)
    assert len(commands) == 2
    for rank, argv in enumerate(commands):
        assert tuple(argv[:3]) == ("python3", "-m", "sglang.launch_server")
        f = flags(argv)
        assert f["--model-path"] == "deepseek-ai/DeepSeek-V2-Lite"
        assert f["--nnodes"] == "2" and f["--node-rank"] == str(rank)
        assert f["--dist-init-addr"] == "10.0.0.1:5000"
        # TP = EP = attention DP = all 16 GPUs (attention TP 1: DP rank r is EP rank r).
        assert f["--tp-size"] == f["--ep-size"] == f["--attn-dp-size"] == "16"
        assert "--enable-dp-attention" not in f and "--dp-size" not in f
        assert f["--init-expert-location"] == "/p/expert_location.json"
        # num_physical = num_logical + redundant (docs/sources.md, SGLang).
        assert f["--ep-num-redundant-experts"] == "16"
        assert f["--ep-dispatch-algorithm"] == "static"
        assert f["--moe-a2a-backend"] == "deepep"
        assert "--enable-return-routed-experts" in f and f["--enable-return-routed-experts"] is None
        assert f["--schedule-policy"] == "routing-key"
        # Online EPLB would overwrite the placement (docs/sources.md, SGLang): never on.
        assert "--enable-eplb" not in f
        # Only node 0 runs HTTP (docs/sources.md, SGLang "DP rank to node").
        if rank == 0:
            assert f["--host"] == "0.0.0.0" and f["--port"] == "30000"
        else:
            assert "--host" not in f and "--port" not in f


def test_dp_rank_layout_matches_sglang():
    # SGLang: --tp 16 --attn-dp-size 16 --nnodes 2 puts DP ranks 0-7 on node 0, 8-15 on node 1.
    nodes = [node_of_dp_rank(r, tp_size=16, attn_dp_size=16, nnodes=2) for r in range(16)]
    assert nodes == [0] * 8 + [1] * 8
    # With attention TP 2 (8 DP ranks over 16 GPUs) ranks 0-3 are on node 0.
    nodes = [node_of_dp_rank(r, tp_size=16, attn_dp_size=8, nnodes=2) for r in range(8)]
    assert nodes == [0] * 4 + [1] * 4
    spec = launch()
    for node in range(spec.nodes):
        for r in spec.dp_ranks(node):
            assert node_of_dp_rank(r, spec.tp_size, spec.tp_size, spec.nodes) == node
    assert list(spec.dp_ranks(0)) == list(range(8))
    with pytest.raises(ConfigError):
        node_of_dp_rank(16, 16, 16, 2)
    with pytest.raises(ConfigError):
        node_of_dp_rank(0, 16, 6, 2)


@pytest.mark.parametrize(
    "version, attn_dp_size, routed, routing_key",
    [
        ("0.5.23", True, True, True),
        ("0.5.23.post1", True, True, True),
        ("0.6.0", True, True, True),
        ("v0.5.24", True, True, True),
        ("0.5.22", True, True, True),
        ("0.5.22rc1", False, True, True),  # a pre-release gets the spelling 0.5.22 still takes
        ("0.5.9", False, True, True),
        ("0.5.8", False, True, True),
        ("0.5.7", False, True, False),
        ("0.5.6", False, False, False),
        ("0.5.5.post3", False, False, False),
        ("0.4.10.post2", False, False, False),
    ],
)
def test_version_switches_attention_dp_routed_experts_and_routing_key(
    version, attn_dp_size, routed, routing_key
):
    spec = launch(version=SglangVersion.parse(version))
    f = flags(node_argv(spec, 0))
    if attn_dp_size:
        assert f["--attn-dp-size"] == "16"
        assert "--enable-dp-attention" not in f and "--dp-size" not in f
    else:
        assert "--attn-dp-size" not in f
        assert "--enable-dp-attention" in f and f["--enable-dp-attention"] is None
        assert f["--dp-size"] == "16"
    assert ("--enable-return-routed-experts" in f) == routed
    assert f.get("--schedule-policy") == ("routing-key" if routing_key else None)
    text = render_shell(spec)
    assert ("return_routed_experts = false" in text) == (not routed)
    # Without routing-key scheduling the listing says why and what is lost.
    assert ("--schedule-policy routing-key is omitted" in text) == (not routing_key)
    if not routing_key:
        assert "(a valid choice from 0.5.8)" in text and "no longer batched together" in text


def test_versions_order_as_pip_orders_them():
    ordered = ["0.5.dev1", "0.5.5", "0.5.5.post3", "0.5.10rc1", "0.5.10", "0.5.23", "1.0"]
    parsed = [SglangVersion.parse(v) for v in ordered]
    assert parsed == sorted(parsed)
    assert SglangVersion.parse("0.5.23") == SglangVersion.parse("0.5.23.0")
    assert str(SglangVersion.parse(" v0.5.23 ")) == "0.5.23"


@pytest.mark.parametrize("text", ["", "banana", "0.5.x", "1..2", "0.5.23-foo", "0.5 .23", "latest"])
def test_garbage_versions_are_rejected(text):
    with pytest.raises(ConfigError, match="is not a version"):
        SglangVersion.parse(text)


def test_single_node_needs_no_dist_init_addr():
    spec = launch(nodes=1, dist_init_addr=None)
    f = flags(node_argv(spec, 0))
    assert "--dist-init-addr" not in f and f["--nnodes"] == "1" and f["--tp-size"] == "8"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dist_init_addr=None), "--dist-init-addr HOST:PORT is required"),
        (dict(dist_init_addr="10.0.0.1"), "must be HOST:PORT"),
        (dict(dist_init_addr="h:70000"), "must be HOST:PORT"),
        (dict(num_slots=60), "fewer than the model's 64 experts"),
        (dict(num_slots=72), "do not split evenly over 16 GPUs"),
        (dict(port=0), "--port 0"),
        (dict(model_path=" "), "--model-path"),
        (dict(extra_args=("--enable-eplb",)), "overwrite the placement"),
        (dict(extra_args=("--tp-size=4",)), "set by sglang-args"),
        (dict(extra_args=("--api-key", "hunter2")), "--api-key-env NAME"),
        (dict(extra_args=("--api-key=hunter2",)), "would write the key itself"),
        (dict(api_key_env="1KEY"), "environment variable name"),
        (dict(api_key_env="MY-KEY"), "environment variable name"),
        (dict(api_key_env="$KEY"), "environment variable name"),
        (dict(api_key_env=""), "environment variable name"),
    ],
)
def test_bad_launch_values_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        launch(**kw)


def test_shell_listing_quotes_values_and_round_trips():
    spec = launch(
        expert_location="/my dir/expert_location.json", extra_args=("--trust-remote-code",)
    )
    text = render_shell(spec, header=["hello"])
    assert text.startswith("# hello\n")
    assert "--enable-eplb is left off" in text
    assert "# node 0: DP ranks 0-7; HTTP on 0.0.0.0:30000" in text
    assert "# node 1: DP ranks 8-15\n" in text
    commands = [
        shlex.split(block.replace("\\\n", " "), comments=True) for block in text.split("\n\n")[1:]
    ]
    assert commands == all_node_argv(spec)


def test_api_key_is_an_environment_reference_on_node_0_only():
    assert "--api-key" not in flags(node_argv(launch(), 0))  # off unless asked for
    spec = launch(api_key_env="SGLANG_API_KEY")
    commands = all_node_argv(spec)
    assert flags(commands[0])["--api-key"] == "$(SGLANG_API_KEY)"  # Kubernetes' $(VAR)
    assert all("--api-key" not in flags(argv) for argv in commands[1:])
    # The flag comes after --port, before the extra arguments.
    spec = launch(api_key_env="K", extra_args=("--enable-metrics",))
    argv = node_argv(spec, 0)
    assert argv[-3:] == ["--api-key", "$(K)", "--enable-metrics"]


def node0_argv_through_sh(text: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Node 0's command of a shell listing run by sh, printing its argv one per line."""
    block = text.split("\n\n")[1]
    command = block.replace("python3 -m sglang.launch_server", "printf '%s\\n'", 1)
    return subprocess.run(
        ["sh", "-c", command], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True
    )


def test_shell_listing_takes_the_key_from_the_environment_and_stops_without_it():
    spec = launch(api_key_env="SGLANG_API_KEY")
    text = render_shell(spec)
    assert '    --api-key "${SGLANG_API_KEY:?set SGLANG_API_KEY to the SGLang API key}"' in text
    assert text.count("\n    --api-key ") == 1  # node 0 only
    key = "a b$c'd\"e`f"  # survives word splitting, $, quotes and backquotes
    done = node0_argv_through_sh(text, {"SGLANG_API_KEY": key})
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split("\n")
    assert printed[printed.index("--api-key") + 1] == key
    assert printed[: printed.index("--api-key")] == node_argv(spec, 0)[3:-2]
    for env in ({}, {"SGLANG_API_KEY": ""}):  # SGLang would run without a key: refuse
        done = node0_argv_through_sh(text, env)
        assert done.returncode != 0 and done.stdout == ""
        assert "set SGLANG_API_KEY to the SGLang API key" in done.stderr
    assert "\n    --api-key" not in render_shell(launch())


@pytest.mark.parametrize(
    "extra, added",
    [
        ((), None),
        (("--expert-distribution-recorder-mode", "per_token"), None),
        (("--expert-distribution-recorder-mode=stat",), "normal"),
        (("--expert-distribution-recorder-mode", "per_pass"), "normal"),
        (("--expert-distribution-recorder-mode", "stat_approx"), "normal"),
        # a --deepep-mode the mode works with is the operator's; nothing is added
        (("--expert-distribution-recorder-mode", "stat", "--deepep-mode", "low_latency"), None),
        (("--expert-distribution-recorder-mode", "stat_approx", "--deepep-mode=normal"), None),
        (("--expert-distribution-recorder-mode", "per_token", "--deepep-mode", "auto"), None),
    ],
)
def test_recorder_modes_get_the_deepep_mode_they_need(extra, added):
    spec = launch(extra_args=extra)
    argv = node_argv(spec, 1)
    given = any(a.split("=", 1)[0] == "--deepep-mode" for a in extra)
    # never two --deepep-mode: SGLang would silently take the last
    assert sum(a.split("=", 1)[0] == "--deepep-mode" for a in argv) == int(given or bool(added))
    if added is not None:
        # right after the a2a backend it belongs to
        i = argv.index("--moe-a2a-backend")
        assert argv[i : i + 4] == ["--moe-a2a-backend", "deepep", "--deepep-mode", added]
        assert f"--deepep-mode {added} is added" in render_shell(spec)
    else:
        assert "is added for --expert-distribution-recorder-mode" not in render_shell(spec)


@pytest.mark.parametrize(
    "extra",
    [
        ("--expert-distribution-recorder-mode", "stat", "--deepep-mode", "auto"),
        ("--expert-distribution-recorder-mode", "per_pass", "--deepep-mode=auto"),
        ("--expert-distribution-recorder-mode", "stat_approx", "--deepep-mode", "low_latency"),
    ],
)
def test_recorder_mode_with_a_deepep_mode_it_cannot_run_is_refused(extra):
    with pytest.raises(ConfigError, match="raises NotImplementedError at startup"):
        launch(extra_args=extra)


def test_models_sglang_cannot_place_are_refused_unknown_ones_warned():
    for name in ("mixtral-8x7b", "mixtral-8x22b", "MixtralForCausalLM"):
        with pytest.raises(ConfigError, match="static dispatch would assert at the first"):
            launch(model_name=name)
    for name in ("deepseek-v2-lite", "deepseek-v3", "qwen3-235b-a22b"):
        assert launch(model_name=name).model_warning is None
    spec = launch(model_name="my-moe")
    assert "'my-moe' was not checked" in (spec.model_warning or "")
    assert "# Warning: model 'my-moe' was not checked" in render_shell(spec)
    assert launch().model_warning is None  # no model name: nothing to say


@pytest.mark.parametrize("alias", ["--model", "--tensor-parallel-size", "--nccl-init-addr"])
def test_other_spellings_of_managed_flags_are_refused(alias):
    with pytest.raises(ConfigError, match="set by sglang-args"):
        launch(extra_args=(alias, "x"))


# ----------------------------------------------------------------------------- CLI


def write_placement(
    directory: Path,
    nodes: int,
    gpus: int,
    redundant: int,
    plan: dict | None = None,
    with_plan: bool = True,
    model: ModelShape = MODEL,
) -> Path:
    slots = model.num_experts + redundant
    phy2log = np.tile(np.arange(slots) % model.num_experts, (model.num_moe_layers, 1))
    placement = Placement(phy2log, model.num_experts, nodes * gpus, gpus)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "expert_location.json", to_sglang(placement, model))
    if with_plan:
        body = {
            "cluster": {"nodes": nodes, "gpus_per_node": gpus, "redundant_experts": redundant},
            "model": model.to_dict(),
        }
        body.update(plan or {})
        write_json_atomic(directory / "plan.json", body, indent=2)
    return directory


def write_topology(path: Path, nodes: int, gpus: int) -> Path:
    path.write_text(f"[cluster]\nnodes = {nodes}\ngpus_per_node = {gpus}\n", encoding="utf-8")
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["sglang-args", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_derives_redundant_experts_from_the_placement(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.toml", 4, 2)
    place = write_placement(tmp_path / "p", 4, 2, redundant=16)
    code, out, _ = run(
        capsys,
        "--topology",
        str(topo),
        "--placement",
        str(place),
        "--model-path",
        "M",
        "--dist-init-addr",
        "n0:5000",
        "--format",
        "json",
    )
    assert code == 0
    data = json.loads(out)
    assert data["ep_num_redundant_experts"] == 16 and data["attn_dp_size"] == 8
    assert [n["node_rank"] for n in data["nodes"]] == [0, 1, 2, 3]
    assert [n["dp_ranks"] for n in data["nodes"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    f = flags(data["nodes"][3]["argv"])
    assert f["--ep-num-redundant-experts"] == "16"
    assert f["--init-expert-location"] == str(place / "expert_location.json")


def test_cli_shell_output_and_placement_path_on_nodes(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.toml", 2, 4)
    place = write_placement(tmp_path / "p", 2, 4, redundant=0)
    code, out, _ = run(
        capsys,
        "--topology",
        str(topo),
        "--placement",
        str(place),
        "--model-path",
        "M",
        "--dist-init-addr",
        "n0:5000",
        "--placement-on-nodes",
        "/etc/moe-scheduler/placement",
        "--extra-args=--trust-remote-code --mem-fraction-static 0.8",
        "--sglang-version",
        "0.5.9",
    )
    assert code == 0
    assert "# node 0: DP ranks 0-3; HTTP on 0.0.0.0:30000" in out
    assert "# node 1: DP ranks 4-7" in out
    assert "--ep-num-redundant-experts 0" in out
    assert "--init-expert-location /etc/moe-scheduler/placement/expert_location.json" in out
    assert "    --enable-dp-attention \\\n    --dp-size 8" in out
    assert "    --attn-dp-size" not in out
    assert "--mem-fraction-static 0.8" in out
    assert out.count("python3 -m sglang.launch_server") == 2


def test_cli_takes_the_model_from_option_when_there_is_no_plan(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.toml", 1, 4)
    place = write_placement(tmp_path / "p", 1, 4, redundant=4, with_plan=False)
    code, _, err = run(
        capsys, "--topology", str(topo), "--placement", str(place), "--model-path", "M"
    )
    assert code == 2 and "give --model" in err
    code, out, _ = run(
        capsys,
        "--topology",
        str(topo),
        "--placement",
        str(place),
        "--model-path",
        "M",
        "--model",
        "deepseek-v2-lite",
    )
    assert code == 0 and "--ep-num-redundant-experts 4" in out


@pytest.mark.parametrize(
    "case, message",
    [
        ("topology", "was placed for 4 x 2 GPUs but"),
        ("width", "not divisible by the EP size 6"),
        ("recorded", "records 8 redundant experts"),
        ("model", "is not the model"),
        ("version", "is not a version"),
        ("missing", "is not a placement directory"),
        ("quote", "--extra-args"),
        ("eplb", "--enable-eplb is refused"),
        ("no-addr", "--dist-init-addr HOST:PORT is required"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, case, message):
    topo = write_topology(tmp_path / "t.toml", 4, 2)
    place = write_placement(tmp_path / "p", 4, 2, redundant=16)
    args = [
        "--topology",
        str(topo),
        "--placement",
        str(place),
        "--model-path",
        "M",
        "--dist-init-addr",
        "n0:5000",
    ]
    if case == "topology":
        args[1] = str(write_topology(tmp_path / "t2.toml", 2, 8))
    elif case == "width":
        # 80 slots on 6 GPUs: a placement for another cluster (no plan to catch it first).
        args[1] = str(write_topology(tmp_path / "t2.toml", 3, 2))
        (place / "plan.json").unlink()
        args += ["--model", "deepseek-v2-lite"]
    elif case == "recorded":
        write_placement(
            place,
            4,
            2,
            redundant=16,
            plan={"cluster": {"nodes": 4, "gpus_per_node": 2, "redundant_experts": 8}},
        )
    elif case == "model":
        args += ["--model", "mixtral-8x7b"]
    elif case == "version":
        args += ["--sglang-version", "five"]
    elif case == "missing":
        args[3] = str(tmp_path / "nowhere")
    elif case == "quote":
        args += ["--extra-args=--served-model-name 'x"]
    elif case == "eplb":
        args += ["--extra-args=--enable-eplb"]
    elif case == "no-addr":
        args = args[:-2]
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("moe-scheduler: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err


def test_cli_refuses_a_mixtral_placement_in_one_line(tmp_path, capsys):
    mixtral = PRESETS["mixtral-8x7b"]
    topo = write_topology(tmp_path / "t.toml", 1, 4)
    place = write_placement(tmp_path / "p", 1, 4, redundant=0, model=mixtral)
    code, out, err = run(
        capsys, "--topology", str(topo), "--placement", str(place), "--model-path", "M"
    )
    assert code == 2 and out == ""
    assert err.startswith("moe-scheduler: error: ") and err.count("\n") == 1, err
    assert "MixtralForCausalLM (python/sglang/srt/models/mixtral.py)" in err
    assert "ignore --init-expert-location" in err and "assert at the first forward pass" in err
    assert "Traceback" not in err


def test_cli_warns_about_a_model_it_has_not_checked(tmp_path, capsys):
    shape = PRESETS["deepseek-v2-lite"]
    unknown = ModelShape("my-moe", shape.num_hidden_layers, shape.moe_layer_ids, 64, 6, 2048)
    topo = write_topology(tmp_path / "t.toml", 1, 4)
    place = write_placement(tmp_path / "p", 1, 4, redundant=0, model=unknown)
    base = ["--topology", str(topo), "--placement", str(place), "--model-path", "M"]
    code, out, err = run(capsys, *base)
    assert code == 0 and "python3 -m sglang.launch_server" in out
    assert err.startswith("moe-scheduler: warning: model 'my-moe' was not checked")
    assert err.count("\n") == 1
    code, out, err = run(capsys, *base, "--format", "json")
    assert code == 0 and any("'my-moe' was not checked" in n for n in json.loads(out)["notes"])


def test_cli_adds_deepep_mode_normal_for_a_stat_recorder(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.toml", 2, 2)
    place = write_placement(tmp_path / "p", 2, 2, redundant=0)
    base = ["--topology", str(topo), "--placement", str(place), "--model-path", "M"]
    base += ["--dist-init-addr", "n0:5000", "--format", "json"]
    code, out, _ = run(capsys, *base, "--extra-args=--expert-distribution-recorder-mode stat")
    assert code == 0
    for node in json.loads(out)["nodes"]:
        assert flags(node["argv"])["--deepep-mode"] == "normal"
    code, out, err = run(
        capsys, *base, "--extra-args=--expert-distribution-recorder-mode stat --deepep-mode auto"
    )
    assert code == 2 and out == "" and "needs --deepep-mode normal or low_latency" in err


def test_cli_asks_sglang_for_an_api_key_from_the_environment_by_default(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.toml", 2, 2)
    place = write_placement(tmp_path / "p", 2, 2, redundant=0)
    base = ["--topology", str(topo), "--placement", str(place), "--model-path", "M"]
    base += ["--dist-init-addr", "n0:5000"]
    code, out, _ = run(capsys, *base)
    assert code == 0
    assert out.count('--api-key "${SGLANG_API_KEY:?') == 1
    assert "set SGLANG_API_KEY on node 0" in out
    code, out, _ = run(capsys, *base, "--format", "json")
    data = json.loads(out)
    assert data["api_key_env"] == "SGLANG_API_KEY"
    assert flags(data["nodes"][0]["argv"])["--api-key"] == "$(SGLANG_API_KEY)"
    assert "--api-key" not in data["nodes"][1]["argv"]
    code, out, _ = run(capsys, *base, "--api-key-env", "MY_KEY", "--format", "json")
    assert flags(json.loads(out)["nodes"][0]["argv"])["--api-key"] == "$(MY_KEY)"
    code, out, _ = run(capsys, *base, "--no-api-key")
    assert code == 0 and "No --api-key" in out
    assert "--api-key " not in out and "--api-key\n" not in out
    code, out, err = run(capsys, *base, "--api-key-env", "bad-name")
    assert code == 2 and "environment variable name" in err and err.count("\n") == 1
    code, out, err = run(capsys, *base, "--extra-args=--api-key=hunter2")
    assert code == 2 and "hunter2" not in err
    with pytest.raises(SystemExit) as exit_:
        main(["sglang-args", *base, "--no-api-key", "--api-key-env", "K"])
    assert exit_.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_cli_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sglang-args", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--sglang-version" in out and "eplb stays off" in out.replace("- ", "-")
    assert "--api-key-env" in out and "--no-api-key" in out


# ----------------------------------------------------------------------------- PD disaggregation


def test_mixed_instances_get_no_disaggregation_flags():
    spec = launch()
    assert spec.role == "mixed" and spec.bootstrap_port is None
    for argv in all_node_argv(spec):
        assert not any(a.startswith("--disaggregation") for a in argv)
    assert "bootstrap" not in render_shell(spec)


@pytest.mark.parametrize(
    "kw, mode, port, backend",
    [
        (dict(disaggregation_mode="prefill"), "prefill", "8998", None),  # SGLang's default
        (
            dict(disaggregation_mode="prefill", disaggregation_bootstrap_port=9100),
            "prefill",
            "9100",
            None,
        ),
        (dict(disaggregation_mode="decode"), "decode", None, None),
        (
            dict(disaggregation_mode="decode", disaggregation_transfer_backend="nixl"),
            "decode",
            None,
            "nixl",
        ),
        (
            dict(disaggregation_mode="prefill", disaggregation_transfer_backend="mooncake"),
            "prefill",
            "8998",
            "mooncake",
        ),
    ],
)
def test_disaggregation_flags_per_role(kw, mode, port, backend):
    spec = launch(**kw)
    assert spec.role == mode
    for argv in all_node_argv(spec):
        f = flags(argv)
        assert f["--disaggregation-mode"] == mode
        # Every prefill node: up to 0.5.9 each rank registers at <dist-init host>:<own port>.
        assert f.get("--disaggregation-bootstrap-port") == port
        assert ("--disaggregation-bootstrap-port" in f) == (port is not None)
        assert f.get("--disaggregation-transfer-backend") == backend
        assert ("--disaggregation-transfer-backend" in f) == (backend is not None)
        assert sum(a.startswith("--disaggregation") for a in argv) == 1 + (port is not None) + (
            backend is not None
        )
    # The placement, scheduling and HTTP flags are unchanged by the role.
    f0 = flags(node_argv(spec, 0))
    assert f0["--init-expert-location"] == "/p/expert_location.json"
    assert f0["--schedule-policy"] == "routing-key" and f0["--port"] == "30000"
    text = render_shell(spec)
    assert f'entry with role = "{mode}" at it' in text
    assert "[backend] url" not in text
    if mode == "prefill":
        assert (
            f"# node 0: DP ranks 0-7; HTTP on 0.0.0.0:30000; bootstrap server on port {port}\n"
            in text
        )
        assert "auto resolves to follow_bootstrap_room on prefill" in text
        assert "first honours the DP rank the scheduler pins" in text
    else:
        assert "# node 0: DP ranks 0-7; HTTP on 0.0.0.0:30000\n" in text
        assert "Decode instance" in text
    assert ("SGLang's default, mooncake" in text) == (backend is None)
    assert "disagg_prefill_dp_rank" not in text  # 0.5.23 has it


@pytest.mark.parametrize(
    "version, warned",
    [("0.5.23", False), ("0.5.22", False), ("0.5.20", False), ("0.5.19", True), ("0.5.9", True)],
)
def test_old_decode_without_disagg_prefill_dp_rank_is_warned_about(version, warned):
    for mode in ("prefill", "decode"):
        spec = launch(version=SglangVersion.parse(version), disaggregation_mode=mode)
        text = render_shell(spec)
        assert ("first checked version whose decode reads disagg_prefill_dp_rank" in text) == warned
        assert flags(node_argv(spec, 1))["--disaggregation-mode"] == mode


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(disaggregation_bootstrap_port=9000), "only with --disaggregation-mode prefill"),
        (
            dict(disaggregation_mode="decode", disaggregation_bootstrap_port=9000),
            "only with --disaggregation-mode prefill",
        ),
        (dict(disaggregation_transfer_backend="nixl"), "needs --disaggregation-mode"),
        (dict(disaggregation_mode="mixed"), "must be prefill or decode"),
        (dict(disaggregation_mode="null"), "must be prefill or decode"),
        (dict(disaggregation_mode="prefill", disaggregation_bootstrap_port=0), "1-65535"),
        (dict(disaggregation_mode="prefill", disaggregation_bootstrap_port=70000), "1-65535"),
        (
            dict(disaggregation_mode="prefill", disaggregation_bootstrap_port=30000),
            "also node 0's --port port",
        ),
        (
            dict(disaggregation_mode="prefill", disaggregation_bootstrap_port=5000),
            "also node 0's --dist-init-addr port",
        ),
        (
            dict(disaggregation_mode="decode", disaggregation_transfer_backend="nixl --x"),
            "must be a backend name",
        ),
        (
            dict(disaggregation_mode="prefill", version=SglangVersion.parse("0.4.9")),
            "older than every version checked for prefill/decode disaggregation",
        ),
        (
            dict(disaggregation_mode="prefill", disaggregation_transfer_backend="fake"),
            "refuse it on prefill",
        ),
        (dict(extra_args=("--disaggregation-mode", "prefill")), "set by sglang-args"),
        (dict(extra_args=("--disaggregation-bootstrap-port=9000",)), "set by sglang-args"),
        (
            dict(
                disaggregation_mode="decode",
                extra_args=("--disaggregation-transfer-backend", "nixl"),
            ),
            "set by sglang-args",
        ),
    ],
)
def test_bad_disaggregation_values_are_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        launch(**kw)


def test_cli_launches_prefill_and_decode_instances(tmp_path, capsys):
    topo = write_topology(tmp_path / "t.toml", 2, 2)
    place = write_placement(tmp_path / "p", 2, 2, redundant=0)
    base = ["--topology", str(topo), "--placement", str(place), "--model-path", "M"]
    base += ["--dist-init-addr", "n0:5000", "--format", "json"]
    code, out, _ = run(capsys, *base)
    data = json.loads(out)
    assert code == 0 and data["role"] == "mixed"
    assert data["disaggregation_bootstrap_port"] is None
    assert data["disaggregation_transfer_backend"] is None
    code, out, _ = run(
        capsys, *base, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "9100"
    )
    data = json.loads(out)
    assert code == 0 and data["role"] == "prefill"
    assert data["disaggregation_bootstrap_port"] == 9100
    for node in data["nodes"]:
        f = flags(node["argv"])
        assert f["--disaggregation-mode"] == "prefill"
        assert f["--disaggregation-bootstrap-port"] == "9100"
    code, out, _ = run(
        capsys,
        *base,
        "--disaggregation-mode",
        "decode",
        "--disaggregation-transfer-backend",
        "nixl",
    )
    data = json.loads(out)
    assert code == 0 and data["role"] == "decode"
    assert data["disaggregation_bootstrap_port"] is None
    assert data["disaggregation_transfer_backend"] == "nixl"
    assert all(
        flags(n["argv"])["--disaggregation-transfer-backend"] == "nixl" for n in data["nodes"]
    )
    code, out, _ = run(capsys, *base[:-2], "--disaggregation-mode", "prefill")
    assert code == 0
    assert out.startswith("# SGLang 0.5.23 prefill instance launch for 2 node(s) x 2 GPU(s)")
    assert out.count("--disaggregation-bootstrap-port 8998") == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--disaggregation-bootstrap-port", "9000"], "only with --disaggregation-mode prefill"),
        (
            ["--disaggregation-mode", "decode", "--disaggregation-bootstrap-port", "9000"],
            "only with --disaggregation-mode prefill",
        ),
        (["--disaggregation-transfer-backend", "nixl"], "needs --disaggregation-mode"),
        (["--disaggregation-mode", "prefill", "--sglang-version", "0.4.9"], "older than every"),
    ],
)
def test_cli_refuses_bad_disaggregation_options_in_one_line(tmp_path, capsys, extra, message):
    topo = write_topology(tmp_path / "t.toml", 1, 4)
    place = write_placement(tmp_path / "p", 1, 4, redundant=0)
    base = ["--topology", str(topo), "--placement", str(place), "--model-path", "M"]
    code, out, err = run(capsys, *base, *extra)
    assert code == 2 and out == ""
    assert err.startswith("moe-scheduler: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:  # not an SGLang mode name argparse knows
        main(["sglang-args", *base, "--disaggregation-mode", "mixed"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
