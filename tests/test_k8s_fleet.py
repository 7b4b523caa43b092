"""The fleet's manifests: KEDA autoscaling per task on its demand, vLLM pods that drain, and the
routers' headless Service that router.peers names (checked like tests/test_k8s.py, offline)."""

from __future__ import annotations

import pytest
import yaml
from test_k8s import (
    OVERLAYS,
    Obj,
    Rendered,
    _config,
    _pod,
    _pod_templates,
    _selects,
    render_variant,
)

from jv4_vllm.deploy.k8s import (
    KEDA_API,
    autoscaled,
    cluster_config,
    drain_seconds,
    render_manifests,
    task_demand_query,
)


@pytest.fixture(scope="module", params=list(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render_variant(request.param)


def _check_scaled_object(obj: Obj, target: Obj) -> None:
    """The fields KEDA's ScaledObject CRD requires, with the types it takes."""
    assert obj["apiVersion"] == KEDA_API and obj["kind"] == "ScaledObject"
    spec = obj["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "advanced", "triggers"}
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": target["metadata"]["name"]}
    assert obj["metadata"]["name"] == target["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    for trigger in spec["triggers"]:
        assert trigger["type"] in ("prometheus", "cpu")
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata values are strings"
        if trigger["type"] == "prometheus":
            assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
            assert int(trigger["metadata"]["threshold"]) > 0


def test_autoscaling_scales_each_task_on_its_demand(rendered: Rendered) -> None:
    backend = rendered.config.backend
    for task, deployment in rendered.config.deployments.items():
        assert autoscaled(deployment), f"{task}: the committed configs scale every task"
        target = rendered.vllm(task)
        scaler = rendered.one("ScaledObject", target["metadata"]["name"])
        _check_scaled_object(scaler, target)
        assert (scaler["spec"]["minReplicaCount"], scaler["spec"]["maxReplicaCount"]) == (
            deployment.min_replicas, deployment.max_replicas)
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["metadata"]["query"] == task_demand_query(task)
        assert f'task="{task}"' in trigger["metadata"]["query"]
        assert trigger["metadata"]["threshold"] == str(backend.tokens_in_flight_per_replica)
        assert "replicas" not in target["spec"], "the autoscaler owns the count: an apply must not reset it"
    _check_scaled_object(rendered.one("ScaledObject", "jv4-vllm-router"), rendered.router)


def test_vllm_pods_drain_before_they_stop(rendered: Rendered) -> None:
    backend = rendered.config.backend
    for task in rendered.config.tasks:
        pod = _pod(rendered.vllm(task))
        (container,) = pod["containers"]
        seconds = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert seconds == drain_seconds(rendered.config)
        assert seconds > backend.dns_refresh_s + 2 * backend.health_interval_s, "routers must drop it first"
        assert pod["terminationGracePeriodSeconds"] > seconds


def test_router_peers_name_the_routers_headless_service(rendered: Rendered) -> None:
    cluster = cluster_config(rendered.config, rendered.variant)
    (peers,) = cluster.router.peers
    service = rendered.one("Service", "jv4-vllm-router-peers")
    spec = service["spec"]
    assert spec["clusterIP"] == "None"
    (port,) = spec["ports"]
    assert peers == f"dns+http://{service['metadata']['name']}:{port['port']}"
    assert port["port"] == cluster.router.port and port["targetPort"] == "http"
    selected = [o["metadata"]["name"] for o, t in _pod_templates(rendered)
                if _selects({"matchLabels": spec["selector"]}, t["metadata"]["labels"])]
    assert selected == [rendered.router["metadata"]["name"]]
    configmap = yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])
    assert configmap["router"]["peers"] == [peers]


def test_a_task_without_max_replicas_keeps_a_fixed_count() -> None:
    config = _config("gpu")
    fixed = {task: d.model_copy(update={"min_replicas": 2, "max_replicas": None})
             for task, d in config.deployments.items()}
    rendered = Rendered("gpu", config, render_manifests(config.model_copy(update={"deployments": fixed}), "gpu"))
    assert [o["metadata"]["name"] for o in rendered.all("ScaledObject")] == ["jv4-vllm-router"]
    assert all(rendered.vllm(task)["spec"]["replicas"] == 2 for task in config.tasks)
