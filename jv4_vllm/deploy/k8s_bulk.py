"""A Kubernetes Indexed Job that runs ``jv4-vllm embed`` (or ``run-batch``) as N workers.

Pod ``i`` of ``N`` takes ``--shard i/N`` of the input (``JOB_COMPLETION_INDEX``) and writes its
own part file on a shared volume, against the router Service. A pod that fails is retried
with the same index and resumes from its part file, so a retry redoes no finished work.
Rendered apart from the service's manifests (a Job is run when there is work, not kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml

from jv4_vllm.config import Config
from jv4_vllm.deploy.k8s import (
    APP,
    HEADER,
    ROUTER_IMAGE,
    ROUTER_SERVICE_PORT,
    _Dumper,
    _meta,
    _pod_security,
    _restricted,
    _tmp,
)

__all__ = ["BULK_FILE", "bulk_job_manifests", "write_bulk_job"]

BULK_FILE = "bulk-job.yaml"
DATA_PVC = f"{APP}-bulk-data"
DATA_MOUNT = "/data"
API_KEY_SECRET = f"{APP}-bulk-api-key"
INDEX = "$(JOB_COMPLETION_INDEX)"
Command = Literal["embed", "run-batch"]


def _job_args(config: Config, command: Command, workers: int, input_path: str, task: str) -> list[str]:
    router = f"http://{APP}-router:{ROUTER_SERVICE_PORT}"
    suffix = "parquet" if command == "embed" else "jsonl"
    args = [command, "-i", input_path, "-o", f"{DATA_MOUNT}/out/part-{INDEX}-of-{workers}.{suffix}",
            "--url", router, "--shard", f"{INDEX}/{workers}", "--quiet"]
    if command == "embed":
        args += ["--task", task, "--model", config.model_name]
    return args


def bulk_job_manifests(config: Config, *, workers: int, command: Command = "embed",
                       input_path: str = f"{DATA_MOUNT}/in/corpus.jsonl", task: str = "retrieval.passage",
                       storage: str = "100Gi") -> list[dict[str, Any]]:
    """The data volume and the Indexed Job of ``workers`` pods."""
    if workers < 1:
        raise ValueError("the bulk Job needs at least one worker")
    tmp_volume, tmp_mount = _tmp()
    container = {
        "name": command, "image": ROUTER_IMAGE, "args": _job_args(config, command, workers, input_path, task),
        "env": [
            {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
            {"name": "JV4_API_KEY", "valueFrom": {"secretKeyRef": {
                "name": API_KEY_SECRET, "key": "key", "optional": True}}},
        ],
        "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}, tmp_mount],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "securityContext": _restricted(),
    }
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(f"{APP}-bulk-{command}", "bulk"),
        "spec": {
            "completionMode": "Indexed", "completions": workers, "parallelism": workers,
            "backoffLimitPerIndex": 4, "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": _meta("", "bulk")["labels"]},
                         "spec": {"restartPolicy": "Never", "securityContext": _pod_security(True),
                                  "containers": [container],
                                  "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": DATA_PVC}},
                                              tmp_volume]}},
        },
    }
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(DATA_PVC, "bulk"),
           "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": storage}}}}
    return [pvc, job]


def write_bulk_job(config: Config, out_dir: str | Path, **options: Any) -> Path:
    """``bulk-job.yaml`` in ``out_dir`` (not in the kustomization: apply it when there is work)."""
    path = Path(out_dir) / BULK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + yaml.dump_all(bulk_job_manifests(config, **options), Dumper=_Dumper, sort_keys=False),
                    encoding="utf-8")
    return path
