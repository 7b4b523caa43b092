"""Config and CLI twins: JV4__ config keys through pydantic-settings, JV4_<COMMAND>_<FLAG> flags."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from jv4_vllm import cli
from jv4_vllm.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo-cpu.yaml"


def test_twins_override_yaml_keys_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("deployments:\n  text-matching: {urls: ['http://a:1'], port: 8002}\n"
                    "  code: {urls: ['http://b:2']}\n")
    env = {"JV4__ROUTER__PORT": "9100", "JV4__DEPLOYMENTS__TEXT_MATCHING__URLS": '["http://c:3", "http://d:4"]',
           "JV4__backend__Wire_Dtype": "bfloat16", "OTHER": "x"}
    config = load_config(path, env)
    assert config.router.port == 9100 and config.backend.wire_dtype == "bfloat16"
    assert config.deployments["text-matching"].urls == ["http://c:3", "http://d:4"]
    assert config.deployments["text-matching"].port == 8002  # merged key by key, not replaced
    assert config.deployments["code"].urls == ["http://b:2"]
    assert list(config.deployments) == ["text-matching", "code"]


def test_a_number_where_a_string_is_meant_and_mapping_keys_keep_their_case() -> None:
    config = load_config(DEMO, {"JV4__VLLM__ENV__VLLM_CPU_KVCACHE_SPACE": "4"})
    assert config.vllm.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}
    quoted = load_config(DEMO, {"JV4__VLLM__ENV__VLLM_CPU_KVCACHE_SPACE": '"4"'})
    assert "vllm_cpu_kvcache_space" not in quoted.vllm.env
    as_json = load_config(DEMO, {"JV4__VLLM__ENV": '{"OMP_NUM_THREADS": 2}', "JV4__VLLM__EXTRA_ARGS": '["--n", 8]'})
    assert as_json.vllm.env["OMP_NUM_THREADS"] == "2" and as_json.vllm.extra_args == ["--n", "8"]


def test_yaml_numbers_are_accepted_for_strings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("deployments: {code: {urls: ['http://b:2']}}\nvllm: {env: {VLLM_CPU_KVCACHE_SPACE: 4}}\n")
    assert load_config(path, {}).vllm.env == {"VLLM_CPU_KVCACHE_SPACE": "4"}


def test_dashed_task_names_without_a_yaml_file() -> None:
    config = load_config(None, {"JV4__DEPLOYMENTS__TEXT_MATCHING__URLS": '["http://c:3"]',
                                "JV4__DEPLOYMENTS__RETRIEVAL__URLS": '["http://r:1"]',
                                "JV4__DEPLOYMENTS__RETRIEVAL__PORT": "8001"})
    assert set(config.tasks) == {"text-matching", "retrieval"}
    assert config.deployments["retrieval"].port == 8001


@pytest.mark.parametrize("env,says", [
    ({"JV4__ROUTER__PORT": "abc"}, "router.port (from JV4__ROUTER__PORT='abc'): Input should be a valid integer"),
    ({"JV4__BACKEND__WIRE_DTYPE": "int8"}, "backend.wire_dtype (from JV4__BACKEND__WIRE_DTYPE='int8')"),
    ({"JV4__ROUTER__NO_SUCH_KEY": "1"}, "JV4__ROUTER__NO_SUCH_KEY: router has no key 'no_such_key'"),
    ({"JV4__NOPE": "1"}, "JV4__NOPE: the config has no key 'nope'"),
    ({"JV4_ROUTER__PORT": "1"}, "config twins start with JV4__ (two underscores), e.g. JV4__ROUTER__PORT"),
    ({"JV4__VLLM__EXTRA_ARGS": "[--enforce-eager"}, "JV4__VLLM__EXTRA_ARGS='[--enforce-eager': not valid JSON"),
    ({"JV4__ROUTER__PORT__X": "1"}, "router.port is a value, not a section"),
])
def test_a_bad_twin_is_one_line_naming_the_variable(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, env)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_bad_twin_stops_the_command_with_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "jv4_vllm.cli", "vllm-command", "--config", str(DEMO),
                           "--task", "code"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "JV4__VLLM__MAX_MODEL_LEN": "lots"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "JV4__VLLM__MAX_MODEL_LEN='lots'" in done.stderr


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        for inner in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in found:
                found += _models(inner)
    return found


def test_every_config_field_has_a_description() -> None:
    missing = [f"{m.__name__}.{name}" for m in _models(Config) for name, f in m.model_fields.items()
               if not f.description]
    assert not missing


# --- CLI twins ------------------------------------------------------------------------------


def _cli_flags(parser: argparse.ArgumentParser) -> dict[tuple[str, str], argparse.Action]:
    """Every flag of ``jv4-vllm`` and of its commands (``bench`` parses its own: a development tool)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    def long(action: argparse.Action) -> str:
        return next(o for o in action.option_strings if o.startswith("--"))

    flags = {("", long(a)): a for a in parser._actions if a.option_strings and a.dest != "help"}
    for name, command in commands.items():
        if name != "bench":
            flags |= {(name, long(a)): a for a in command._actions if a.option_strings and a.dest != "help"}
    return flags


def test_every_cli_flag_has_a_twin_of_its_own_or_a_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = _cli_flags(cli._parser())
    assert {("", "--log-level"), ("prepare", "--tasks"), ("router", "--config")} <= set(flags)
    owners: dict[str, int] = {}
    for (command, flag), action in flags.items():
        twin = cli.twin_name(command, flag)
        owners[twin] = owners.get(twin, 0) + 1
        assert f"[env {twin}]" in action.help, (command, flag)
        switch = isinstance(action, argparse._StoreTrueAction)
        value = ("yes" if switch else str(action.choices[0]) if action.choices
                 else "3" if action.type in (int, float) else "from-env")
        monkeypatch.setenv(twin, value)
        again = _cli_flags(cli._parser())[(command, flag)]
        monkeypatch.delenv(twin)
        want = True if switch else [value] if action.nargs == "*" else (action.type or str)(value)
        assert again.default == want and not again.required, (command, flag, twin)
    shared = {twin for twin, count in owners.items() if count > 1}
    assert shared == {"JV4_CONFIG", "JV4_API_KEY"}
    assert set(cli.SHARED_TWINS.values()) == {"JV4_CONFIG", "JV4_LOG_LEVEL", "JV4_API_KEY"}
    assert cli.twin_name("embed", "--shard") == "JV4_EMBED_SHARD" != cli.twin_name("run-batch", "--shard")
    assert cli.twin_name("prepare", "--out") == "JV4_PREPARE_OUT" != cli.twin_name("k8s", "--out")
    assert cli.twin_name("demo-checkpoint", "--hidden-size") == "JV4_DEMO_CHECKPOINT_HIDDEN_SIZE"


def test_prepare_tasks_by_flag_or_by_its_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["prepare", "--source", "src", "--out", "out"]
    assert cli._names(cli._parser().parse_args(base).tasks) is None  # all tasks
    assert cli._names(cli._parser().parse_args([*base, "--tasks", "code", "retrieval"]).tasks) == ["code", "retrieval"]
    monkeypatch.setenv("JV4_PREPARE_TASKS", "retrieval, text-matching code")
    assert cli._names(cli._parser().parse_args(base).tasks) == ["retrieval", "text-matching", "code"]
    assert cli._names(cli._parser().parse_args([*base, "--tasks", "code,retrieval"]).tasks) == ["code", "retrieval"]


@pytest.mark.parametrize("twin,value,says", [
    ("JV4_DEMO_CHECKPOINT_SEED", "abc", "JV4_DEMO_CHECKPOINT_SEED='abc': not a valid int"),
    ("JV4_K8S_VARIANT", "tpu", "JV4_K8S_VARIANT='tpu': use one of cpu-demo, gpu"),
])
def test_a_bad_cli_twin_is_one_line(twin: str, value: str, says: str, tmp_path: Path) -> None:
    command = ["demo-checkpoint", "--out", str(tmp_path)] if "SEED" in twin else [
        "k8s", "--config", str(DEMO), "--out", str(tmp_path)]
    other = subprocess.run([sys.executable, "-m", "jv4_vllm.cli", "vllm-command", "--config", str(DEMO), "--task",
                            "code"], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), twin: value})
    assert other.returncode == 0, other.stderr  # another command's twin does not stop this one
    done = subprocess.run([sys.executable, "-m", "jv4_vllm.cli", *command], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), twin: value})
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and says in done.stderr, done.stderr


def test_each_deployment_gets_its_own_gpu_from_its_env() -> None:
    """`up` and `serve-adapter` start every task's server with vllm.env plus its deployment's env,
    and `vllm-command` prints that prefix: three adapters on three GPUs of one machine."""
    gpu = REPO / "configs" / "jina-v4-gpu.yaml"
    config = load_config(gpu, {"JV4__VLLM__ENV__HF_HOME": "/cache"})
    devices = [config.server_env(task)["CUDA_VISIBLE_DEVICES"] for task in config.tasks]
    assert sorted(devices) == ["0", "1", "2"]
    assert all(config.server_env(task)["HF_HOME"] == "/cache" for task in config.tasks)
    done = subprocess.run([sys.executable, "-m", "jv4_vllm.cli", "vllm-command", "--config", str(gpu),
                           "--task", "code"], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.stdout.startswith("CUDA_VISIBLE_DEVICES=2 vllm serve ")
