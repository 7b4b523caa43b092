"""Cluster sizes for the rendered manifests: real GPUs, or a CPU-only demo cluster.

Everything that depends on the hardware rather than on the service config lives here;
finer tuning (storage class, node selectors, sizes) belongs in a kustomize patch on top
of the rendered output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Resources", "VARIANTS", "Variant"]


@dataclass(frozen=True)
class Resources:
    """Container requests and limits (Kubernetes quantities)."""

    requests: dict[str, str]
    limits: dict[str, str]


@dataclass(frozen=True)
class Variant:
    """How the service is sized and stored on one kind of cluster."""

    gpu: bool  # one nvidia.com/gpu per vLLM pod
    vllm: Resources
    router: Resources
    prepare: Resources
    shm_size: str  # the in-memory /dev/shm of vLLM pods
    storage: str  # the model volume: source download + three merged checkpoints
    # Router and vLLM pods on several nodes read the volume at once: ReadWriteMany.
    access_mode: str
    demo_source: bool  # the prepare Job first builds the tiny demo checkpoint
    api_keys_required: bool  # the router pod will not start without the API key Secret
    router_min_replicas: int = 2
    router_max_replicas: int = 10
    # Prompt tokens a router pod pools per second before another is added: about half of what two
    # cores pooled into multi-vectors in the router-ceiling benchmark (80k tokens/s per core).
    router_tokens_per_s: int = 80_000
    # The Prometheus that scrapes the router pods (their prometheus.io annotations); KEDA asks it.
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    wait: Resources = field(default_factory=lambda: Resources(
        requests={"cpu": "10m", "memory": "16Mi"}, limits={"cpu": "100m", "memory": "64Mi"}))


_ROUTER = Resources(requests={"cpu": "500m", "memory": "512Mi"}, limits={"cpu": "2", "memory": "2Gi"})

VARIANTS: dict[str, Variant] = {
    "gpu": Variant(
        gpu=True,
        vllm=Resources(requests={"cpu": "4", "memory": "24Gi"}, limits={"cpu": "8", "memory": "32Gi"}),
        router=_ROUTER,
        prepare=Resources(requests={"cpu": "2", "memory": "24Gi"}, limits={"cpu": "4", "memory": "32Gi"}),
        shm_size="2Gi",
        storage="64Gi",
        access_mode="ReadWriteMany",
        demo_source=False,
        api_keys_required=True,
    ),
    # A laptop cluster (kind, minikube, k3d) on one node: ReadWriteOnce is enough there.
    "cpu-demo": Variant(
        gpu=False,
        vllm=Resources(requests={"cpu": "1", "memory": "4Gi"}, limits={"cpu": "2", "memory": "6Gi"}),
        router=Resources(requests={"cpu": "250m", "memory": "256Mi"}, limits={"cpu": "1", "memory": "1Gi"}),
        prepare=Resources(requests={"cpu": "1", "memory": "2Gi"}, limits={"cpu": "2", "memory": "4Gi"}),
        shm_size="1Gi",
        storage="2Gi",
        access_mode="ReadWriteOnce",
        demo_source=True,
        api_keys_required=False,
        router_max_replicas=3,
        router_tokens_per_s=20_000,
    ),
}
