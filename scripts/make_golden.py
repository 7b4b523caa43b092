"""Write a golden file: the probe set's vectors from jina-embeddings-v4's own code.

Run it once on a machine with a GPU, the network and the upstream model's requirements
(its remote code targets transformers 4.5x and needs peft)::

    pip install -e . "torch>=2.4" "transformers>=4.52,<5" peft
    python scripts/make_golden.py --out golden.json --max-length 32768

It loads ``jinaai/jina-embeddings-v4`` with ``trust_remote_code`` and encodes every probe
with Jina's ``encode_text`` / ``encode_image`` (bf16, as Jina runs it): every task, both
roles, single and multi-vector. ``--max-length`` must be the text length the deployment
keeps (min of ``vllm.max_model_len`` and the model's positions). Then, anywhere::

    jv4-vllm verify --config CONFIG --url ROUTER_URL --golden golden.json

``--reference-encoder DIR`` makes the same file with this project's transformers
reference encoder on a local checkpoint instead (no network; used by the tests).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jv4_vllm.oracle.golden import ReferenceOracle, expected_vectors, write_golden
from jv4_vllm.oracle.probes import build_probes

UPSTREAM = "jinaai/jina-embeddings-v4"


class JinaOracle:
    """jina-embeddings-v4's own encode_text / encode_image; files are given as paths, as Jina's
    users give them (its loader opens them with ``Image.open(path).convert("RGB")``)."""

    def __init__(self, model: Any, max_length: int, workdir: Path) -> None:
        self.model = model
        self.max_length = max_length
        self.workdir = workdir

    @staticmethod
    def _arrays(values: Any) -> list[np.ndarray]:
        return [np.asarray(v.float().cpu().numpy(), np.float32) for v in values]

    def text(self, texts: list[str], task: str, role: str, multivector: bool) -> list[np.ndarray]:
        return self._arrays(self.model.encode_text(texts=texts, task=task, prompt_name=role, batch_size=1,
                                                   max_length=self.max_length, return_multivector=multivector))

    def image_files(self, files: list[bytes], task: str, multivector: bool) -> list[np.ndarray]:
        paths = []
        for position, data in enumerate(files):
            path = self.workdir / f"probe-{position}.img"
            path.write_bytes(data)
            paths.append(str(path))
        return self.pil_or_paths(paths, task, multivector)

    def pil(self, images: list[Any], task: str, multivector: bool) -> list[np.ndarray]:
        return self.pil_or_paths(images, task, multivector)

    def pil_or_paths(self, images: list[Any], task: str, multivector: bool) -> list[np.ndarray]:
        return self._arrays(self.model.encode_image(images=images, task=task, batch_size=1,
                                                    return_multivector=multivector))


def _jina(model_id: str, device: str, max_length: int, workdir: Path) -> tuple[JinaOracle, Any, dict[str, Any]]:
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_id, trust_remote_code=True, torch_dtype=torch.bfloat16).to(device).eval()
    tokenizer = model.processor.tokenizer
    meta = {"made_by": f"{model_id} encode_text/encode_image (trust_remote_code)", "model": model_id,
            "revision": getattr(model.config, "_commit_hash", None), "dtype": "bfloat16",
            "tasks": list(model.config.task_names)}
    return JinaOracle(model, max_length, workdir), tokenizer, meta


def _ours(source: str, max_length: int, overlap: int) -> tuple[ReferenceOracle, Any, dict[str, Any]]:
    from jv4_vllm.oracle.reference import ReferenceEncoder

    reference = ReferenceEncoder(source, max_length=max_length)
    meta = {"made_by": "jv4_vllm reference encoder", "model": str(source), "dtype": "float32",
            "tasks": list(reference.task_names), "late_chunking_overlap": overlap}
    return ReferenceOracle(reference, overlap=overlap), reference.processor.tokenizer, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="golden JSON file to write")
    parser.add_argument("--max-length", type=int, default=32768, help="text tokens the deployment keeps")
    parser.add_argument("--model", default=UPSTREAM, help="upstream model id or directory")
    parser.add_argument("--device", default="cuda", help="torch device for the upstream model")
    parser.add_argument("--reference-encoder", metavar="DIR", default=None,
                        help="use this project's reference encoder on a local checkpoint instead")
    parser.add_argument("--tasks", nargs="*", default=None, help="tasks to encode (default: all)")
    parser.add_argument("--late-chunking-overlap", type=int, default=256,
                        help="the deployment's backend.late_chunking_overlap (reference encoder only: Jina's "
                             "model code has no late chunking, so its golden files hold no late-chunking probes)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        if args.reference_encoder:
            oracle, tokenizer, meta = _ours(args.reference_encoder, args.max_length, args.late_chunking_overlap)
        else:
            oracle, tokenizer, meta = _jina(args.model, args.device, args.max_length, Path(workdir))
        probes = build_probes(lambda text: len(tokenizer(text)["input_ids"]), args.max_length)
        tasks = args.tasks or meta.pop("tasks")
        meta.pop("tasks", None)
        entries = expected_vectors(oracle, probes, tasks)
    meta.update({"max_length": args.max_length, "tasks": tasks,
                 "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    path = write_golden(args.out, meta, probes, entries)
    print(f"{path}: {len(entries)} vectors for {len(probes.texts)} texts, {len(probes.images)} image files, "
          f"{len(probes.pil_images)} PIL images; tasks {tasks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
