#!/usr/bin/env bash
# In-process embedding throughput against sentence-transformers on PyTorch (CPU), in one run,
# on the corpus in fixtures/: fleet-model's `throughput` example, then the peer, at each batch size.
# PyTorch goes into a throwaway venv (default /tmp/fleet-st-venv), never into the project.
# Usage: ops/bench-vs-pytorch.sh [batch sizes...]   (default: 32 128)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ $# -gt 0 ]; then batches=("$@"); else batches=(32 128); fi
venv=${FLEET_ST_VENV:-/tmp/fleet-st-venv}
corpus="$root/fixtures/corpus.jsonl"
model="$root/models/all-MiniLM-L6-v2"
"$root/ops/fetch-model.sh"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import sentence_transformers" 2>/dev/null; then
  python3 -m venv "$venv"
  # torch without its CUDA dependencies (gigabytes, unused on CPU), then the rest.
  "$venv/bin/pip" install --quiet --no-deps torch
  "$venv/bin/pip" install --quiet sentence-transformers filelock typing-extensions sympy networkx jinja2 fsspec
fi
cargo build --quiet --release -p fleet-model --example throughput
bin="${CARGO_TARGET_DIR:-$root/target}/release/examples/throughput"
for batch in "${batches[@]}"; do
  echo "fleet-model:"
  "$bin" --model "$model" --corpus "$corpus" --batch "$batch" --runs 3 --roofline
  echo "sentence-transformers:"
  OMP_NUM_THREADS=$(nproc) "$venv/bin/python" "$root/ops/bench/sentence_transformers_encode.py" "$model" "$corpus" "$batch" 3 2>&1 |
    grep -v -e "Loading weights" -e Warning
done
