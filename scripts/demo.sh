#!/usr/bin/env bash
# The whole stack on the tiny demo checkpoint: build it, bring up three vLLM
# deployments and the router, send a text and an image with the openai SDK,
# then stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/demo-cpu.yaml
URL=${JV4_DEMO_URL:-http://127.0.0.1:8080}

[ -x .venv/bin/jv4-vllm ] || scripts/setup.sh
[ -f models/demo-source/config.json ] || .venv/bin/jv4-vllm demo-checkpoint --out models/demo-source

.venv/bin/jv4-vllm up --config "$CONFIG" &
up_pid=$!
stop() { kill -TERM "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true; }
trap stop EXIT

echo "waiting for the stack (first start prepares the checkpoints and takes about a minute)..."
for _ in $(seq 1 600); do
  if curl -fs "$URL/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$up_pid" 2>/dev/null; then echo "the stack failed to start; see logs/" >&2; exit 1; fi
  sleep 1
done
curl -fs "$URL/ready" >/dev/null || { echo "the stack was not ready in time; see logs/" >&2; exit 1; }

.venv/bin/python scripts/demo_requests.py "$URL"
echo "demo done; stopping the stack"
