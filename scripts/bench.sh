#!/usr/bin/env bash
# One command for the performance numbers in docs/performance.md: builds the wire-realistic demo
# checkpoint (hidden size 2048, one layer) if missing, prepares the retrieval task, then
# `jv4-vllm bench` starts ONE vLLM deployment, the router and the replay upstreams, runs
# every path, writes bench-results/ (results.json, results.md, throughput.png,
# router-profile.txt, long-inputs-router.md) and stops everything it started.
# Extra arguments go to the benchmark, e.g. scripts/bench.sh --duration 5 --concurrency 1,4,16
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
MODELS="${JV4_BENCH_MODELS:-models/bench-2048}"
OUT="${JV4_BENCH_OUT:-bench-results}"

if [ ! -f "$MODELS/source/config.json" ]; then
    "$PYTHON" -m jv4_vllm.cli demo-checkpoint --out "$MODELS/source" --hidden-size 2048
fi
if [ ! -f "$MODELS/prepared/retrieval/jv4.json" ]; then
    "$PYTHON" -m jv4_vllm.cli prepare --source "$MODELS/source" --out "$MODELS/prepared" --tasks retrieval
fi
"$PYTHON" -m jv4_vllm.cli bench -- --source "$MODELS/source" --prepared "$MODELS/prepared" --out "$OUT" \
    --profile 5 "$@"
# Full-length passages (16k tokens, bf16 wire) under load: items/s, failures, router memory, /health latency.
exec "$PYTHON" -m jv4_vllm.cli bench -- long-inputs --source "$MODELS/source" --prepared "$MODELS/prepared" \
    --out "$OUT" --rounds 1
