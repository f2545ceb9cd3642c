"""deploy/: Kubernetes manifests schema-validated (kubernetes-validate for built-in kinds,
jsonschema plus kubernetes-validate for the LeaderWorkerSet CRD), compose files, example
configurations, Prometheus and Grafana checked against docs/server.md, the container
health probe against a real gRPC health server."""

from __future__ import annotations

import functools
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
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


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
            "--extra-args=--enable-metrics",
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
    # DeepSeek-V2/V3 run on SGLang's own model code: no model-repository Python is run.
    for role in ("leaderTemplate", "workerTemplate"):
        assert "--trust-remote-code" not in lws_args(role)


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


def pod_templates() -> dict[str, dict[str, Any]]:
    """Every pod template: the scheduler's and the LWS leader's and worker's."""
    template = find("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return {
        "scheduler": find("Deployment", "moe-scheduler")["spec"]["template"],
        "sglang-leader": template["leaderTemplate"],
        "sglang-worker": template["workerTemplate"],
    }


# --------------------------------------------------------------------- NetworkPolicy

CLIENT_LABEL = {"moe-scheduler/client": "true"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}
#: The namespace the manifests are applied in (any: kustomization sets none).
HOME_NS = {"kubernetes.io/metadata.name": "inference"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


@functools.cache
def network_policies() -> tuple[dict[str, Any], ...]:
    return tuple(d["spec"] for _, d in manifests() if d["kind"] == "NetworkPolicy")


def ingress_allowed(pod: dict[str, str], port: int, peer: dict[str, str], peer_ns=HOME_NS):
    """NetworkPolicy semantics (ingress, TCP): may a pod labelled ``peer`` in a namespace
    labelled ``peer_ns`` open ``port`` on a pod labelled ``pod`` in HOME_NS?"""
    selecting = [p for p in network_policies() if selects(p["podSelector"], pod)]
    if not selecting:
        return True  # not isolated
    for spec in selecting:
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(
                q.get("protocol", "TCP") == "TCP" and q["port"] == port for q in ports
            ):
                continue
            for source in rule.get("from", []):
                assert "ipBlock" not in source
                ns = source.get("namespaceSelector")
                ns_ok = peer_ns == HOME_NS if ns is None else selects(ns, peer_ns)
                if ns_ok and selects(source.get("podSelector", {}), peer):
                    return True
    return False


@functools.cache
def _template_labels() -> dict[str, dict[str, str]]:
    return {name: t["metadata"]["labels"] for name, t in pod_templates().items()}


def template_labels(name: str) -> dict[str, str]:
    return dict(_template_labels()[name])


def test_only_the_schedulers_reach_sglangs_http_port():
    scheduler = template_labels("scheduler")
    for target in ("sglang-leader", "sglang-worker"):
        sglang = template_labels(target)
        assert ingress_allowed(sglang, 30000, scheduler)
        assert not ingress_allowed(sglang, 30000, {"app": "anything"})
        assert not ingress_allowed(sglang, 30000, CLIENT_LABEL)  # clients go via the scheduler
        assert not ingress_allowed(sglang, 30000, PROMETHEUS, MONITORING)
        assert not ingress_allowed(sglang, 30000, scheduler, MONITORING)  # other namespace
        assert not ingress_allowed(sglang, 5000, scheduler)  # not torch.distributed
        # The group's own traffic: dist-init, NCCL, Gloo, DeepEP bootstrap on any port.
        for port in (5000, 30000, 29500, 41234):
            assert ingress_allowed(sglang, port, template_labels("sglang-worker"))
            assert ingress_allowed(sglang, port, template_labels("sglang-leader"))


def test_only_labelled_clients_reach_the_scheduler_and_prometheus_its_metrics():
    scheduler = template_labels("scheduler")
    assert ingress_allowed(scheduler, 50051, CLIENT_LABEL)
    assert ingress_allowed(scheduler, 50051, {**CLIENT_LABEL, "app": "envoy"})
    assert not ingress_allowed(scheduler, 50051, {"moe-scheduler/client": "yes"})
    assert not ingress_allowed(scheduler, 50051, {"app": "anything"})
    assert not ingress_allowed(scheduler, 50051, template_labels("sglang-leader"))
    other_ns = {"kubernetes.io/metadata.name": "tenant-a"}
    assert not ingress_allowed(scheduler, 50051, CLIENT_LABEL, other_ns)
    assert ingress_allowed(scheduler, 50051, CLIENT_LABEL, {**other_ns, **CLIENT_LABEL})
    assert not ingress_allowed(scheduler, 50051, {"app": "x"}, {**other_ns, **CLIENT_LABEL})
    assert ingress_allowed(scheduler, 9464, PROMETHEUS, MONITORING)
    assert not ingress_allowed(scheduler, 50051, PROMETHEUS, MONITORING)
    assert not ingress_allowed(scheduler, 9464, PROMETHEUS, other_ns)
    assert not ingress_allowed(scheduler, 9464, CLIENT_LABEL)  # metrics are Prometheus's
    for port in (50051, 9464):  # the selectors match the Services' ports
        service = find("Service", "moe-scheduler")["spec"]
        assert port in {q["port"] for q in service["ports"]}


def test_network_policies_cover_every_pod_and_are_documented():
    for name, template in pod_templates().items():
        labels = template["metadata"]["labels"]
        assert not ingress_allowed(labels, 30000, {"app": "stranger"}), name
        assert not ingress_allowed(labels, 50051, {"app": "stranger"}), name
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for text in (
        'moe-scheduler/client: "true"',
        "monitoring",
        "app.kubernetes.io/name: prometheus",
    ):
        assert text in readme, text
    prometheus = (DEPLOY / "monitoring" / "prometheus.yml").read_text(encoding="utf-8")
    assert "networkpolicy.yaml" in prometheus


# ------------------------------------------------------------------ pod security


def test_every_pod_runs_as_non_root_without_privileges():
    for name, template in pod_templates().items():
        spec = template["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostIPC"), name
        assert not spec.get("hostPID") and not spec.get("shareProcessNamespace"), name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert not context.get("privileged"), name
            assert context.get("runAsUser", pod["runAsUser"]) != 0, name
            for mount in container["volumeMounts"]:
                assert not mount["mountPath"].startswith("/root"), (name, mount)


def test_sglang_pods_have_a_writable_home_and_model_cache_for_a_non_root_user():
    for name in ("sglang-leader", "sglang-worker"):
        spec = pod_templates()[name]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for variable in ("HOME", "HF_HOME"):
            path = env[variable]
            mount = next(m for p, m in mounts.items() if path == p or path.startswith(p + "/"))
            assert not mount.get("readOnly"), (name, variable)
            assert "configMap" not in volumes[mount["name"]], (name, variable)
        assert env["USER"]  # getpass.getuser() without a passwd entry


# ------------------------------------------------------------------------ secrets

SECRET = "moe-scheduler-secrets"
#: env var -> Secret key, per pod template; nothing else reads the Secret.
SECRET_ENV = {
    "scheduler": {
        "MOE_SCHEDULER_BACKEND_API_KEY": "sglang-api-key",
        "MOE_SCHEDULER_ADMIN_TOKEN": "admin-token",
    },
    "sglang-leader": {"SGLANG_API_KEY": "sglang-api-key"},
    "sglang-worker": {},
}


def secret_env(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None and ref["name"] == SECRET:
            assert not ref.get("optional"), e["name"]
            out[e["name"]] = ref["key"]
    return out


def test_secrets_reach_sglang_and_the_scheduler_only_from_the_secret():
    for name, template in pod_templates().items():
        (container,) = template["spec"]["containers"]
        assert secret_env(container) == SECRET_ENV[name], name
        for e in container.get("env", []):
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e["name"]):
                assert "value" not in e, f"{name}: {e['name']} has a literal value"
    # SGLang's --api-key is the env reference Kubernetes expands, on the leader only.
    leader = lws_args("leaderTemplate")
    assert leader[leader.index("--api-key") + 1] == "$(SGLANG_API_KEY)"
    assert leader.count("--api-key") == 1
    assert "--api-key" not in lws_args("workerTemplate")
    assert "--admin-api-key" not in leader


def test_the_secret_is_generated_from_an_uncommitted_file():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    (generator,) = kustomization["secretGenerator"]
    assert generator["name"] == SECRET
    assert generator["envs"] == ["secrets.env"]
    # The LWS is a CRD kustomize cannot rewrite names in: the name must stay as written.
    assert generator["options"]["disableNameSuffixHash"] is True
    assert "secrets.env" in (K8S / ".gitignore").read_text(encoding="utf-8").split()
    assert "secrets.env" not in git_files()
    assert not any(d["kind"] == "Secret" for _, d in manifests())  # no values committed
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for name in (SECRET, "sglang-api-key", "admin-token", "deploy/k8s/secrets.env"):
        assert name in readme, name


def git_files() -> set[str]:
    import subprocess

    done = subprocess.run(
        ["git", "ls-files", "deploy"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return {Path(line).name for line in done.stdout.split()}


def test_kustomize_builds_valid_manifests_with_a_secrets_file(tmp_path):
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("secrets.env"))
    build = [kubectl, "kustomize", str(copy)]
    failed = subprocess.run(build, capture_output=True, text=True, check=False)
    assert failed.returncode != 0 and "secrets.env" in failed.stderr  # fails closed
    (copy / "secrets.env").write_text("sglang-api-key=k1\nadmin-token=t1\n", encoding="utf-8")
    built = subprocess.run(build, capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == SECRET
    assert set(secret["data"]) == {"sglang-api-key", "admin-token"}
    for doc in docs:
        if doc["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["kind"] for d in docs} >= {"NetworkPolicy", "Secret", "LeaderWorkerSet"}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    if doc["kind"] == "LeaderWorkerSet":
        t = doc["spec"]["leaderWorkerTemplate"]
        return [c for r in ("leaderTemplate", "workerTemplate") for c in t[r]["spec"]["containers"]]
    return []


# ----------------------------------------------------------------------------- compose


#: Values for required variables (``${VAR:?message}``, ``${VAR}``) when none is given.
PLACEHOLDERS = {"SGLANG_URL": "http://placeholder:30000"}


def substitute(text: str, env: dict[str, str] | None = None) -> str:
    """Compose interpolation: ``${VAR:-default}``, and ``${VAR:?message}`` / ``${VAR}`` from
    ``env`` or a placeholder (``placeholder-<var>``, or PLACEHOLDERS)."""
    env = env or {}

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        if name in env:
            return env[name]
        if match.group(2) == ":-":
            return default
        return PLACEHOLDERS.get(name, f"placeholder-{name.lower()}")

    return re.sub(r"\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}", value, text)


def compose(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return yaml.safe_load(substitute((DEPLOY / name).read_text(encoding="utf-8"), env))


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
    assert {"127.0.0.1:50051:50051", "127.0.0.1:9464:9464"} <= set(ports)


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_publishes_every_port_on_loopback_by_default(name):
    for service, spec in compose(name)["services"].items():
        for port in spec.get("ports", []):
            assert isinstance(port, str) and port.count(":") == 2, (service, port)
            assert port.startswith("127.0.0.1:"), (service, port)
    # The scheduler's ports can be published elsewhere on purpose; the emulator's cannot.
    moved = compose(name, {"MOE_SCHEDULER_PUBLISH": "10.1.2.3"})["services"]
    assert all(p.startswith("10.1.2.3:") for p in moved["scheduler"]["ports"])
    if "emulator" in moved:
        assert moved["emulator"]["ports"] == ["127.0.0.1:30000:30000"]


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_takes_the_secrets_from_the_environment(name):
    text = (DEPLOY / name).read_text(encoding="utf-8")
    # Required (":?": unset or empty stops compose), never a literal.
    assert re.search(r"MOE_SCHEDULER_BACKEND_API_KEY: \"\$\{SGLANG_API_KEY:\?", text)
    assert 'MOE_SCHEDULER_ADMIN_TOKEN: "${MOE_SCHEDULER_ADMIN_TOKEN:-}"' in text
    env = {"SGLANG_API_KEY": "k-123", "MOE_SCHEDULER_ADMIN_TOKEN": "t-456"}
    services = compose(name, env)["services"]
    assert services["scheduler"]["environment"] == {
        "MOE_SCHEDULER_BACKEND_API_KEY": "k-123",
        "MOE_SCHEDULER_ADMIN_TOKEN": "t-456",
    }
    if "emulator" in services:
        args = build_parser().parse_args(services["emulator"]["command"])
        assert args.api_key == "k-123"  # the emulator's (SGLang's) --api-key, same value


def test_compose_secrets_file_is_a_template_and_ignored():
    assert ".env" in (DEPLOY / ".gitignore").read_text(encoding="utf-8").split()
    assert ".env" not in git_files()
    example = (DEPLOY / "env.example").read_text(encoding="utf-8")
    values = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#")
    )
    assert values == {"SGLANG_API_KEY": "", "MOE_SCHEDULER_ADMIN_TOKEN": ""}  # no real values
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "deploy/.env" in readme and "MOE_SCHEDULER_PUBLISH" in readme


def test_compose_emulator_command_is_accepted_and_matches_the_placement():
    command = compose("compose.yaml")["services"]["emulator"]["command"]
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
    from prometheus_client import generate_latest

    from scheduler.server.metrics import ServerMetrics

    exposition = generate_latest(ServerMetrics().registry).decode()
    exposed = {
        line.split()[2]
        for line in exposition.splitlines()
        if line.startswith("# TYPE") and not line.split()[2].endswith("_created")
    }
    assert documented == exposed, documented ^ exposed
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
