"""``jv4-vllm``: every subcommand; each flag has an environment twin.

Twins are named and read by :mod:`jv4_vllm.cli_twins` (``JV4_PREPARE_OUT`` for
``prepare --out``; ``JV4_CONFIG``, ``JV4_LOG_LEVEL`` and ``JV4_API_KEY`` shared on purpose).
Config keys have their own twins, ``JV4__SECTION__KEY`` (two underscores; see
:mod:`jv4_vllm.config`). A twin holding a bad value is a one-line error, as a bad flag is.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from jv4_vllm.cli_twins import SHARED_TWINS, add_flag, twin_name

__all__ = ["SHARED_TWINS", "main", "twin_name"]
_add = add_flag


def _names(values: list[str] | str | None) -> list[str] | None:
    """Names given as separate arguments, or in one string separated by spaces or commas (JV4_PREPARE_TASKS)."""
    parts = [values] if isinstance(values, str) else values or []
    return [name for part in parts for name in part.replace(",", " ").split()] or None


def _config(args: argparse.Namespace):
    from jv4_vllm.config import load_config
    return load_config(args.config)


def cmd_demo_checkpoint(args: argparse.Namespace) -> int:
    from jv4_vllm.checkpoint.demo import build_demo_checkpoint
    out = build_demo_checkpoint(Path(args.out), seed=args.seed, hidden_size=args.hidden_size)
    print(f"demo checkpoint written to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from jv4_vllm.checkpoint.prepare import prepare
    written = prepare(args.source, Path(args.out), tasks=_names(args.tasks))
    for task, path in written.items():
        print(f"{task}: {path}")
    return 0


def cmd_vllm_command(args: argparse.Namespace) -> int:
    import shlex

    from jv4_vllm.deploy.vllm_args import vllm_serve_command
    config = _config(args)
    deployment = config.deployments.get(args.task)
    env = [f"{key}={value}" for key, value in deployment.env.items()] if deployment else []
    print(shlex.join(env + vllm_serve_command(config, args.task, model_root=args.model_root)))
    return 0


def cmd_serve_adapter(args: argparse.Namespace) -> int:
    from jv4_vllm.deploy.launch import serve_adapter
    return serve_adapter(_config(args), args.task)


def cmd_router(args: argparse.Namespace) -> int:
    from jv4_vllm.router import run
    run(_config(args))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from jv4_vllm.deploy.launch import up
    return up(_config(args), Path(args.config))


def cmd_verify(args: argparse.Namespace) -> int:
    from jv4_vllm.oracle.verify import verify
    return verify(_config(args), router_url=args.url, golden=args.golden, single_min=args.min_single,
                  multi_min=args.min_multi)


def cmd_k8s(args: argparse.Namespace) -> int:
    from jv4_vllm.deploy.k8s import write_manifests
    for path in write_manifests(_config(args), Path(args.out), variant=args.variant):
        print(path)
    if args.bulk_workers:
        from jv4_vllm.deploy.k8s_bulk import write_bulk_job
        print(write_bulk_job(_config(args), Path(args.out), workers=args.bulk_workers, command=args.bulk_command,
                             input_path=args.bulk_input, task=args.bulk_task))
    return 0


def cmd_run_batch(args: argparse.Namespace) -> int:
    from jv4_vllm.bulk.cli import run_batch_command
    return run_batch_command(args)


def cmd_embed(args: argparse.Namespace) -> int:
    from jv4_vllm.bulk.cli import embed_command
    return embed_command(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from jv4_vllm.bench import main as bench_main
    return bench_main([a for a in args.bench_args if a != "--"])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jv4-vllm", description="Serve jina-embeddings-v4 on vLLM.")
    _add(parser, "", "--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str,
                config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        if config:
            _add(p, name, "--config", required=True, help="YAML config file")
        return p

    p = command("demo-checkpoint", cmd_demo_checkpoint, "Write a tiny random jina-embeddings-v4 checkpoint.", False)
    _add(p, "demo-checkpoint", "--out", required=True, help="output directory")
    _add(p, "demo-checkpoint", "--seed", type=int, default=0, help="random seed")
    _add(p, "demo-checkpoint", "--hidden-size", type=int, default=128, help="text hidden size (2048 = wire-realistic)")

    p = command("prepare", cmd_prepare, "Merge each task's LoRA into its own vLLM-ready checkpoint.", False)
    _add(p, "prepare", "--source", required=True, help="jina-embeddings-v4 directory or Hugging Face id")
    _add(p, "prepare", "--out", required=True, help="output directory (one subdirectory per task)")
    _add(p, "prepare", "--tasks", nargs="*", default=None, help="tasks to prepare, by spaces or commas (default: all)")

    p = command("serve-adapter", cmd_serve_adapter, "Run the vLLM server of one task (prints the command first).")
    _add(p, "serve-adapter", "--task", required=True, help="retrieval, text-matching or code")

    p = command("vllm-command", cmd_vllm_command, "Print the `vllm serve` command line of one task.")
    _add(p, "vllm-command", "--task", required=True, help="retrieval, text-matching or code")
    _add(p, "vllm-command", "--model-root", default=None,
         help="directory holding the prepared tasks (default: prepared_dir)")

    command("router", cmd_router, "Run the OpenAI-compatible router.")
    command("up", cmd_up, "Prepare what is missing, start all deployments and the router, supervise them.")

    p = command("verify", cmd_verify, "Compare the running service with the reference encoder, per probe.")
    _add(p, "verify", "--url", default=None, help="router URL (default: talk to the deployments directly)")
    _add(p, "verify", "--golden", default=None, help="compare with this golden file (scripts/make_golden.py) "
                                           "instead of the reference encoder")
    _add(p, "verify", "--min-single", type=float, default=0.9999, help="lowest single-vector cosine that passes")
    _add(p, "verify", "--min-multi", type=float, default=0.999, help="lowest multi-vector row cosine that passes")

    p = command("k8s", cmd_k8s, "Render the Kubernetes manifests.")
    _add(p, "k8s", "--out", required=True, help="output directory")
    _add(p, "k8s", "--variant", default="gpu", choices=["cpu-demo", "gpu"], help="gpu or cpu-demo")
    _add(p, "k8s", "--bulk-workers", type=int, default=0, help="also write bulk-job.yaml: an Indexed Job of N workers")
    _add(p, "k8s", "--bulk-command", default="embed", choices=["embed", "run-batch"], help="what the bulk Job runs")
    _add(p, "k8s", "--bulk-input", default="/data/in/corpus.jsonl", help="input path on the bulk Job's data volume")
    _add(p, "k8s", "--bulk-task", default="retrieval.passage", help="task of a bulk embed Job")

    from jv4_vllm.bulk.cli import add_embed_flags, add_job_flags
    p = command("run-batch", cmd_run_batch, "Run an OpenAI batch file (JSONL) through the service; resumable.", False)
    add_job_flags(p, "run-batch")
    p = command("embed", cmd_embed, "Embed a corpus (JSONL, Parquet or a directory) into Parquet; resumable.", False)
    add_job_flags(p, "embed")
    add_embed_flags(p, "embed")

    p = command("bench", cmd_bench, "Benchmark the paths side by side (see `jv4-vllm bench -- --help`).", False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "bad_twin", None):
        print(f"jv4-vllm: error: {args.bad_twin}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per probe is noise
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:  # ConfigError among them: one line, no traceback
        print(f"jv4-vllm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
