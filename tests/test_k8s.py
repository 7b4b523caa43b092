"""The Kubernetes manifests and the container image, checked without a cluster or Docker.

Every rendered object validates against the Kubernetes OpenAPI schema (offline, strict),
the policies the deployment relies on hold on the objects themselves, the committed
configs/k8s/ output equals a fresh render (the image rules: tests/test_dockerfile.py).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from jv4_vllm.config import Config, load_config
from jv4_vllm.deploy.k8s import (
    KEDA_API,
    cluster_config,
    manifest_files,
    render_manifests,
    write_manifests,
)
from jv4_vllm.deploy.vllm_args import vllm_serve_command

REPO = Path(__file__).resolve().parents[1]
# Overlay directory under configs/k8s -> the config it is rendered from.
OVERLAYS = {"gpu": "configs/jina-v4-gpu.yaml", "cpu-demo": "configs/k8s-cpu-demo.yaml"}
K8S_VERSIONS = ["1.33", latest_version()]
VLLM_PORT = 8000
MODEL_MOUNT = "/models"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    variant: str
    config: Config
    objects: list[Obj]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def vllm(self, task: str) -> Obj:
        return self.one("Deployment", f"jv4-vllm-{task}")

    @property
    def router(self) -> Obj:
        return self.one("Deployment", "jv4-vllm-router")


def _config(variant: str) -> Config:
    return load_config(REPO / OVERLAYS[variant], environ={})


def render_variant(variant: str) -> Rendered:
    config = _config(variant)
    return Rendered(variant, config, render_manifests(config, variant))


@pytest.fixture(scope="module", params=list(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render_variant(request.param)


def _pod(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def _containers(pod: Obj) -> list[Obj]:
    return pod.get("initContainers", []) + pod["containers"]


def _pod_templates(r: Rendered) -> Iterator[tuple[Obj, Obj]]:
    for obj in r.objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _pod_labels(r: Rendered, component: str) -> list[dict[str, str]]:
    return [t["metadata"]["labels"] for o, t in _pod_templates(r)
            if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]


# ---------------------------------------------------------------- schema


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(rendered: Rendered, version: str) -> None:
    for obj in rendered.objects:
        if obj["apiVersion"] == KEDA_API:
            continue  # a custom resource: not in the Kubernetes schema (checked in test_autoscaling_*)
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {exc.message} at {list(exc.path)}")


def test_the_schema_check_rejects_a_broken_manifest(rendered: Rendered) -> None:
    broken = copy.deepcopy(rendered.router)
    _pod(broken)["containers"][0]["readinesProbe"] = _pod(broken)["containers"][0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# ---------------------------------------------------------------- policies for every workload


def test_every_container_has_requests_limits_and_probes(rendered: Rendered) -> None:
    for obj, template in _pod_templates(rendered):
        pod = template["spec"]
        for c in _containers(pod):
            where = f"{obj['metadata']['name']}/{c['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(part, {})), f"{where}: {part}"
        if obj["kind"] == "Job":
            continue  # a batch job is judged by its exit code
        for c in pod["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{obj['metadata']['name']}/{c['name']}"


def test_images_are_pinned_to_a_version(rendered: Rendered) -> None:
    for obj, template in _pod_templates(rendered):
        for c in _containers(template["spec"]):
            image = c["image"]
            name, _, tag = image.rpartition("/")[2].partition(":")
            assert "@sha256:" in image or re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{image} is not pinned"
            assert "latest" not in tag


def test_workloads_do_not_get_service_links_or_api_tokens(rendered: Rendered) -> None:
    for obj, template in _pod_templates(rendered):
        pod = template["spec"]
        assert pod["enableServiceLinks"] is False, obj["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False, obj["metadata"]["name"]


# ---------------------------------------------------------------- vLLM deployments


def test_vllm_command_is_the_one_vllm_serve_command(rendered: Rendered, tmp_path: Path) -> None:
    config = rendered.config
    model_root = f"{MODEL_MOUNT}/{config.prepared_dir.name}"
    # `jv4-vllm vllm-command --config <the router's ConfigMap>` prints the pod's command too.
    configmap = rendered.one("ConfigMap")["data"]["config.yaml"]
    (tmp_path / "cluster.yaml").write_text(configmap)
    in_cluster = load_config(tmp_path / "cluster.yaml", environ={})
    assert in_cluster == cluster_config(config, rendered.variant)
    for task in config.tasks:
        container = _pod(rendered.vllm(task))["containers"][0]
        expected = vllm_serve_command(config, task, model_root=model_root, port=VLLM_PORT)
        assert container["command"] + container["args"] == expected
        assert vllm_serve_command(in_cluster, task) == expected
        assert container["image"] == config.vllm.image


def test_vllm_pods_have_shm_readonly_models_and_patient_probes(rendered: Rendered) -> None:
    for task in rendered.config.tasks:
        pod = _pod(rendered.vllm(task))
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        models = mounts[MODEL_MOUNT]
        assert models["readOnly"] is True
        assert volumes[models["name"]]["persistentVolumeClaim"] == {"claimName": "jv4-vllm-models", "readOnly": True}
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/health"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "a 7.5 GB load needs time"
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
        gpus = [c["resources"][part].get("nvidia.com/gpu") for c in [container] for part in ("requests", "limits")]
        assert gpus == (["1", "1"] if rendered.variant == "gpu" else [None, None])
        assert {e["name"]: e.get("value") for e in container["env"]}.items() >= rendered.config.vllm.env.items()


def test_headless_services_reach_every_pod_of_their_task_only(rendered: Rendered) -> None:
    urls = {task: d.urls for task, d in cluster_config(rendered.config, rendered.variant).deployments.items()}
    for task in rendered.config.tasks:
        service = rendered.one("Service", f"jv4-vllm-{task}")
        spec = service["spec"]
        assert spec["clusterIP"] == "None"
        selected = [o["metadata"]["name"] for o, t in _pod_templates(rendered)
                    if _selects({"matchLabels": spec["selector"]}, t["metadata"]["labels"])]
        assert selected == [f"jv4-vllm-{task}"]
        (port,) = spec["ports"]
        (container_port,) = _pod(rendered.vllm(task))["containers"][0]["ports"]
        assert port["targetPort"] == container_port["name"] and port["port"] == container_port["containerPort"]
        assert urls[task] == [f"dns+http://{service['metadata']['name']}:{port['port']}"]


def test_prepare_job_fills_the_volume_the_pods_read(rendered: Rendered) -> None:
    job = rendered.one("Job")
    pod = _pod(job)
    (container,) = pod["containers"]
    cluster = cluster_config(rendered.config, rendered.variant)
    args = container["args"]
    assert args[:5] == ["prepare", "--source", cluster.source, "--out", str(cluster.prepared_dir)]
    assert args[5:] == ["--tasks", *rendered.config.tasks]
    assert str(cluster.prepared_dir).startswith(MODEL_MOUNT + "/")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == MODEL_MOUNT)
    assert mount["readOnly"] is False
    claim = {v["name"]: v for v in pod["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == rendered.one("PersistentVolumeClaim")["metadata"]["name"]
    if rendered.variant == "cpu-demo":
        (demo,) = pod["initContainers"]
        assert demo["args"] == ["demo-checkpoint", "--out", cluster.source]


# ---------------------------------------------------------------- router


def test_router_is_replicated_locked_down_and_probed(rendered: Rendered) -> None:
    router = rendered.router
    pod = _pod(router)
    (container,) = pod["containers"]
    assert router["spec"]["replicas"] >= 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for c in _containers(pod):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    port = cluster_config(rendered.config, rendered.variant).router.port
    assert container["ports"] == [{"name": "http", "containerPort": port}]

    scaler = rendered.one("ScaledObject", router["metadata"]["name"])
    assert scaler["spec"]["scaleTargetRef"]["name"] == router["metadata"]["name"]
    assert 2 <= scaler["spec"]["minReplicaCount"] < scaler["spec"]["maxReplicaCount"]
    assert not rendered.all("HorizontalPodAutoscaler"), "KEDA makes the HPAs; a second one would fight it"
    pdb = rendered.one("PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"], router["spec"]["template"]["metadata"]["labels"])
    service = rendered.one("Service", "jv4-vllm-router")
    assert service["spec"]["type"] == "ClusterIP"
    assert _selects({"matchLabels": service["spec"]["selector"]}, router["spec"]["template"]["metadata"]["labels"])
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_router_reads_its_configmap_and_api_keys_from_a_secret(rendered: Rendered) -> None:
    pod = _pod(rendered.router)
    (container,) = pod["containers"]
    config_path = container["args"][container["args"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
    configmap = rendered.one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.rpartition("/")[2] in configmap["data"]
    keys_env = rendered.config.router.api_keys_env
    (env,) = [e for e in container["env"] if e["name"] == keys_env]
    assert set(env["valueFrom"]) == {"secretKeyRef"}
    assert env["valueFrom"]["secretKeyRef"]["optional"] is (rendered.variant != "gpu")
    assert not rendered.all("Secret"), "secrets are created by the operator, never committed"
    # The router reads each task's jv4.json and projector from the shared volume, read-only.
    models = next(m for m in container["volumeMounts"] if m["mountPath"] == MODEL_MOUNT)
    assert models["readOnly"] is True


# ---------------------------------------------------------------- network policy


def test_only_router_pods_may_reach_vllm_pods(rendered: Rendered) -> None:
    (policy,) = rendered.all("NetworkPolicy")
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    vllm, router, prepare = (_pod_labels(rendered, c) for c in ("vllm", "router", "prepare"))
    assert len(vllm) == len(rendered.config.tasks)
    assert all(_selects(spec["podSelector"], labels) for labels in vllm)
    assert not any(_selects(spec["podSelector"], labels) for labels in router + prepare)
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespace or IP block may be let in"
    assert all(_selects(peer["podSelector"], labels) for labels in router)
    assert not any(_selects(peer["podSelector"], labels) for labels in vllm + prepare)
    assert rule["ports"] == [{"protocol": "TCP", "port": VLLM_PORT}]


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
    ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {"b": "1"}, False),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": "1"}, True),
    ({}, {"a": "1"}, True),
])
def test_selector_semantics(selector: Obj, labels: dict[str, str], expected: bool) -> None:
    assert _selects(selector, labels) is expected


# ---------------------------------------------------------------- committed output


@pytest.mark.parametrize("variant", list(OVERLAYS))
def test_committed_manifests_equal_a_fresh_render(variant: str) -> None:
    directory = REPO / "configs" / "k8s" / variant
    fresh = manifest_files(_config(variant), variant)
    committed = {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.yaml"))}
    hint = f"render again: jv4-vllm k8s --config {OVERLAYS[variant]} --variant {variant} --out configs/k8s/{variant}"
    assert sorted(committed) == sorted(fresh), hint
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} drifted; {hint}"


def test_kustomization_lists_every_manifest_file(rendered: Rendered) -> None:
    files = manifest_files(rendered.config, rendered.variant)
    kustomization = yaml.safe_load(files.pop("kustomization.yaml"))
    assert kustomization["resources"] == list(files)
    parsed = [doc for text in files.values() for doc in yaml.safe_load_all(text)]
    assert parsed == rendered.objects


def test_write_manifests_writes_the_rendered_files(tmp_path: Path) -> None:
    config = _config("cpu-demo")
    paths = write_manifests(config, tmp_path / "out", "cpu-demo")
    assert {p.name: p.read_text() for p in paths} == manifest_files(config, "cpu-demo")


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        render_manifests(_config("gpu"), "tpu")


def test_the_router_pod_outlives_its_drain(rendered: Rendered) -> None:
    """preStop pause, then the whole drain (router.shutdown_grace_s), inside the termination grace."""
    from jv4_vllm.deploy.k8s import ROUTER_PRESTOP_S

    router = next(o for o in rendered.objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("router"))
    pod = router["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(ROUTER_PRESTOP_S)]
    assert pod["terminationGracePeriodSeconds"] >= ROUTER_PRESTOP_S + rendered.config.router.shutdown_grace_s
