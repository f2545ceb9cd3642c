"""deploy/: Kubernetes manifests schema-validated (kubernetes-validate for built-in kinds,
jsonschema plus kubernetes-validate for the LeaderWorkerSet CRD), compose files, example
configurations, Prometheus and Grafana checked against docs/server.md, the container
health probe against a real gRPC health server."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from concurrent import futures
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from scheduler.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
EXAMPLES = DEPLOY / "examples"
#: Schemas of this Kubernetes version (the newest kubernetes-validate 1.37.0 ships).
K8S_VERSION = "1.37.0"
VERSION_ANNOTATION = "moe-scheduler.io/placement-version"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out.extend((path.name, d) for d in load_docs(path))
    return out


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for _, d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def server_doc() -> str:
    return (REPO / "docs" / "server.md").read_text(encoding="utf-8")


def documented_config_keys() -> set[str]:
    block = re.search(r"```toml\n(.*?)```", server_doc(), re.S)
    assert block, "docs/server.md has no TOML block"
    data = tomllib.loads(block.group(1))
    return {f"{section}.{key}" for section, table in data.items() for key in table}


def documented_metrics() -> set[str]:
    names: set[str] = set()
    for line in server_doc().splitlines():
        if not line.startswith("| `moe_scheduler_"):
            continue
        first_cell = line.split("|")[1]
        previous = ""
        for token in re.findall(r"`([a-z_]+)`", first_cell):
            name = previous.rsplit("_", 1)[0] + token if token.startswith("_") else token
            names.add(name)
            previous = name
    return names


def toml_keys(data: dict[str, Any]) -> set[str]:
    return {f"{section}.{key}" for section, table in data.items() for key in table}


# ----------------------------------------------------------------------------- Kubernetes


def test_every_builtin_manifest_validates_against_the_kubernetes_schema():
    kinds = set()
    for name, doc in manifests():
        if doc["kind"] == "LeaderWorkerSet":
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message}")
        kinds.add(doc["kind"])
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds


def test_schema_validation_catches_mistakes():
    bad = json.loads(json.dumps(find("Deployment")))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(find("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["sevice"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


#: The fields of leaderworkerset.x-k8s.io/v1 LeaderWorkerSet that deploy/k8s uses; the pod
#: templates themselves are validated as Kubernetes PodTemplates.
LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
            },
        },
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["size", "workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                        "leaderTemplate": {"$ref": "#/$defs/podTemplate"},
                        "workerTemplate": {"$ref": "#/$defs/podTemplate"},
                    },
                },
            },
        },
    },
    "$defs": {
        "podTemplate": {
            "type": "object",
            "required": ["spec"],
            "additionalProperties": False,
            "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
        }
    },
}


def test_leaderworkerset_validates():
    lws = find("LeaderWorkerSet")
    jsonschema.validate(lws, LWS_SCHEMA)
    template = lws["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"sglang-{role.lower()}"},
            "template": template[role],
        }
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{role}: {e.message}")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**lws, "spec": {**lws["spec"], "replicas": -1}}, LWS_SCHEMA)


def lws_args(role: str) -> list[str]:
    template = find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"][role]
    (container,) = template["spec"]["containers"]
    assert container["command"] == ["python3", "-m", "sglang.launch_server"]
    return [str(a) for a in container["args"]]


def test_leaderworkerset_args_are_what_sglang_args_prints(capsys):
    lws = find("LeaderWorkerSet")
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    code = main(
        [
            "sglang-args",
            "--topology",
            str(DEPLOY / "topologies" / "4x2.toml"),
            "--placement",
            str(EXAMPLES / "placement"),
            "--model-path",
            "deepseek-ai/DeepSeek-V2-Lite",
            "--placement-on-nodes",
            "/etc/moe-scheduler/placement",
            "--dist-init-addr",
            "$(LWS_LEADER_ADDRESS):5000",
            "--extra-args=--trust-remote-code --enable-metrics",
            "--format",
            "json",
        ]
    )
    assert code == 0
    nodes = json.loads(capsys.readouterr().out)["nodes"]
    assert len(nodes) == size
    assert lws_args("leaderTemplate") == nodes[0]["argv"][3:]
    worker = nodes[1]["argv"][3:]
    worker[worker.index("--node-rank") + 1] = "$(LWS_WORKER_INDEX)"
    assert lws_args("workerTemplate") == worker
    assert "--enable-eplb" not in lws_args("leaderTemplate")


def test_sglang_pods_mount_the_placement_and_shared_memory():
    template = find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        spec = template[role]["spec"]
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        placement = volumes[mounts["/etc/moe-scheduler/placement"]]["configMap"]
        assert placement["name"] == "moe-scheduler-config"
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 2  # 4x2.toml
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in leader["ports"]} >= {30000}
    service = find("Service", "sglang-leader")
    assert (
        service["spec"]["selector"].items()
        <= template["leaderTemplate"]["metadata"]["labels"].items()
    )


def test_scheduler_deployment_probes_ports_and_replicas():
    deployment = find("Deployment", "moe-scheduler")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["serve", "--config", "/etc/moe-scheduler/scheduler.toml"]
    assert container["readinessProbe"]["grpc"] == {
        "port": 50051,
        "service": "moe_scheduler.v1.Scheduler",
    }
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert {p["containerPort"] for p in container["ports"]} == {50051, 9464}
    config = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")["configMap"]
    assert {i["key"]: i["path"] for i in config["items"]} == {
        "scheduler.toml": "scheduler.toml",
        "expert_location.json": "placement/expert_location.json",
        "plan.json": "placement/plan.json",
    }
    for service in ("moe-scheduler", "moe-scheduler-headless"):
        spec = find("Service", service)["spec"]
        assert {p["port"] for p in spec["ports"]} == {50051, 9464}
        assert spec["selector"].items() <= pod["metadata"]["labels"].items()
    assert find("Service", "moe-scheduler-headless")["spec"]["clusterIP"] == "None"
    pdb = find("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["minAvailable"] < deployment["spec"]["replicas"]


def test_configmap_holds_the_example_placement_and_a_documented_config():
    configmap = find("ConfigMap", "moe-scheduler-config")
    data = configmap["data"]
    for name in ("expert_location.json", "plan.json"):
        assert data[name] == (EXAMPLES / "placement" / name).read_text(encoding="utf-8")
    config = tomllib.loads(data["scheduler.toml"])
    example = tomllib.loads((EXAMPLES / "scheduler.toml").read_text(encoding="utf-8"))
    assert toml_keys(config) == toml_keys(example)
    assert toml_keys(config) <= documented_config_keys()
    assert config["server"]["replicas"] == find("Deployment")["spec"]["replicas"]
    assert config["server"]["listen"] == "0.0.0.0:50051"
    assert config["server"]["metrics_listen"] == "0.0.0.0:9464"
    assert config["cluster"]["placement"] == "placement/"
    assert config["backend"]["url"] == "http://sglang-leader:30000"
    assert config["policy"]["capacity"] >= config["server"]["replicas"]


def test_placement_version_is_the_same_everywhere():
    data = find("ConfigMap")["data"]
    # The server's placement version (scheduler/server/cluster.py).
    raw = data["expert_location.json"].encode() + b"\0" + data["plan.json"].encode()
    version = hashlib.sha256(raw).hexdigest()[:16]
    assert find("ConfigMap")["metadata"]["annotations"][VERSION_ANNOTATION] == version
    pod = find("Deployment")["spec"]["template"]["metadata"]
    assert pod["annotations"][VERSION_ANNOTATION] == version
    template = find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        assert template[role]["metadata"]["annotations"][VERSION_ANNOTATION] == version


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].split(":")[0] for _, d in manifests() for c in containers(d)}
    assert used <= images


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    if doc["kind"] == "LeaderWorkerSet":
        t = doc["spec"]["leaderWorkerTemplate"]
        return [c for r in ("leaderTemplate", "workerTemplate") for c in t[r]["spec"]["containers"]]
    return []


# ----------------------------------------------------------------------------- compose


def substitute(text: str) -> str:
    """Compose interpolation with defaults (``${VAR:-default}``) and placeholders."""
    text = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{[A-Z_]+(:\?[^}]*)?\}", "http://placeholder:30000", text)


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_parse_and_reference_existing_files(name):
    compose = yaml.safe_load(substitute((DEPLOY / name).read_text(encoding="utf-8")))
    assert compose["services"]["scheduler"]["command"] == [
        "serve",
        "--config",
        "/etc/moe-scheduler/scheduler.toml",
    ]
    for service in compose["services"].values():
        build = service["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        assert all(":" in p for p in service.get("ports", []))
    ports = compose["services"]["scheduler"]["ports"]
    assert {"50051:50051", "9464:9464"} <= set(ports)


def test_compose_emulator_command_is_accepted_and_matches_the_placement():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    command = compose["services"]["emulator"]["command"]
    args = build_parser().parse_args(command)
    assert (args.host, args.port, args.no_data) == ("0.0.0.0", 30000, True)
    plan = json.loads((EXAMPLES / "placement" / "plan.json").read_text(encoding="utf-8"))
    assert (args.nodes, args.gpus_per_node) == (
        plan["cluster"]["nodes"],
        plan["cluster"]["gpus_per_node"],
    )
    assert args.ep_num_redundant_experts == plan["cluster"]["redundant_experts"]
    assert args.init_expert_location == "/etc/moe-scheduler/placement/expert_location.json"
    config = tomllib.loads((EXAMPLES / "scheduler.toml").read_text(encoding="utf-8"))
    assert config["backend"]["url"] == "http://emulator:30000"


def test_example_configs_use_documented_keys():
    documented = documented_config_keys()
    gpu = yaml.safe_load(substitute((DEPLOY / "compose.gpu.yaml").read_text(encoding="utf-8")))
    texts = {
        "scheduler.toml": (EXAMPLES / "scheduler.toml").read_text(encoding="utf-8"),
        "scheduler.local.toml": (EXAMPLES / "scheduler.local.toml").read_text(encoding="utf-8"),
        "compose.gpu.yaml": gpu["configs"]["scheduler_toml"]["content"],
    }
    for name, text in texts.items():
        config = tomllib.loads(text)
        assert toml_keys(config) <= documented, (name, toml_keys(config) - documented)
        assert config["backend"]["url"].startswith("http://")
        assert config["prediction"]["mode"] == "none"  # no predictor bundle shipped
    local = tomllib.loads(texts["scheduler.local.toml"])
    assert (EXAMPLES / local["cluster"]["placement"] / "expert_location.json").is_file()
    assert local["server"]["listen"].startswith("127.0.0.1:")


# ----------------------------------------------------------------------------- image


def test_dockerfile_and_dockerignore():
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^EXPOSE 50051 9464$", text, re.M)
    assert 'ENTRYPOINT ["moe-scheduler"]' in text
    assert 'CMD ["serve", "--config", "/etc/moe-scheduler/scheduler.toml"]' in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), source
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "demo-output", "benchmarks/work"} <= set(ignored)


# ----------------------------------------------------------------------------- monitoring


def test_prometheus_scrapes_the_scheduler_metrics_port():
    config = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for t in jobs["moe-scheduler"]["static_configs"][0]["targets"]]
    assert targets and all(t.endswith(":9464") for t in targets)
    assert jobs["sglang"]["metrics_path"] == "/metrics"
    k8s = jobs["moe-scheduler-k8s"]["relabel_configs"]
    assert {"moe-scheduler-headless", "metrics"} <= {r.get("regex") for r in k8s}


def test_grafana_dashboard_uses_only_documented_metrics():
    dashboard = json.loads(
        (DEPLOY / "monitoring" / "grafana-dashboard.json").read_text(encoding="utf-8")
    )
    documented = documented_metrics()
    assert "moe_scheduler_backend_waiting" in documented and len(documented) == 15
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bmoe_scheduler_[a-z_]+", target["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
            if "histogram_quantile" in target["expr"]:
                assert "_bucket[" in target["expr"]
    assert used <= documented, used - documented
    assert used == documented  # every exported metric has a panel
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- health probe


@pytest.fixture
def health_server():
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, health_pb2.HealthCheckResponse
    finally:
        server.stop(None)


def test_healthcheck_exit_status_follows_the_service_status(health_server, capsys):
    from scheduler.deploy.healthcheck import main as probe

    target, servicer, response = health_server
    servicer.set("moe_scheduler.v1.Scheduler", response.SERVING)
    assert probe([target]) == 0
    assert "SERVING" in capsys.readouterr().out
    servicer.set("moe_scheduler.v1.Scheduler", response.NOT_SERVING)
    assert probe([target]) == 1
    assert probe([target, "--service", "unknown.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_healthcheck_reports_an_unreachable_server(capsys):
    import socket

    from scheduler.deploy.healthcheck import main as probe

    # A port that was just bound and released is very likely closed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert probe([f"127.0.0.1:{closed}", "--timeout", "1"]) == 1
    assert "failed: " in capsys.readouterr().out
