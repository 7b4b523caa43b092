"""The bulk Indexed Job that `jv4-vllm k8s --bulk-workers N` renders, checked without a cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from jv4_vllm.bulk.cli import add_job_flags
from jv4_vllm.bulk.shard import parse_shard
from jv4_vllm.config import load_config
from jv4_vllm.deploy.k8s_bulk import bulk_job_manifests

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "jina-v4-gpu.yaml"


@pytest.mark.parametrize("command", ["embed", "run-batch"])
@pytest.mark.parametrize("version", ["1.33", latest_version()])
def test_the_job_validates_and_shards_by_completion_index(command, version):
    objects = bulk_job_manifests(load_config(CONFIG), workers=4, command=command)
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    job = next(obj for obj in objects if obj["kind"] == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[0] == command and args[args.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/4"
    assert "$(JOB_COMPLETION_INDEX)" in args[args.index("-o") + 1]  # one part file per worker: resumable
    assert args[args.index("--url") + 1] == "http://jv4-vllm-router:80"
    assert "JOB_COMPLETION_INDEX" in {env["name"] for env in container["env"]}  # so $(...) expands
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]["claimName"]
    assert claim in {obj["metadata"]["name"] for obj in objects if obj["kind"] == "PersistentVolumeClaim"}
    # what the pod runs parses, once Kubernetes has put the index in
    import argparse
    parser = argparse.ArgumentParser()
    add_job_flags(parser, command)
    parser.add_argument("--task")
    parser.add_argument("--model")
    expanded = [a.replace("$(JOB_COMPLETION_INDEX)", "3") for a in args[1:]]
    parsed = parser.parse_args(expanded)
    assert parse_shard(parsed.shard).index == 3 and parsed.quiet


def test_the_cli_writes_the_job_apart_from_the_kustomization(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jv4_vllm.cli", "k8s", "--config", str(CONFIG), "--out",
                           str(tmp_path), "--bulk-workers", "3"], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    job = next(o for o in yaml.safe_load_all((tmp_path / "bulk-job.yaml").read_text()) if o["kind"] == "Job")
    assert job["spec"]["completions"] == 3
    assert "bulk-job.yaml" not in (tmp_path / "kustomization.yaml").read_text()
