#!/usr/bin/env bash
# End-to-end embedding throughput against in-process throughput, in one run (release build):
# first the model alone on the corpus, then the same corpus through nats-server, one dispatcher
# and one worker by request-reply (`loadtest embed`).
# Usage: ops/bench-e2e.sh [batch size] [texts per job] [in flight]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
batch=${1:-32}
texts_per_job=${2:-1}
in_flight=${3:-512}
corpus="$root/fixtures/corpus.jsonl"
"$root/ops/install-deps.sh"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
build_fleet
cargo build --quiet --release -p fleet-model --example throughput
model="$root/models/all-MiniLM-L6-v2"

echo "in-process:"
"$bin/examples/throughput" --model "$model" --corpus "$corpus" --batch "$batch" --runs 3

start_nats
bench_tenant
RUST_LOG=warn spawn dispatcher "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0
RUST_LOG=warn spawn worker "$bin/worker" --nats-url "$url" --tenants "$work/tenants.toml" --model-dir "$model" --metrics-addr 127.0.0.1:0 \
  --max-batch-size "$batch" --max-in-flight "$in_flight" --max-ack-pending $((in_flight * 2)) \
  --max-delay 5ms
# Warm-up: the first answer proves the dispatcher and the worker (with its model) are ready.
wait_first_answer
echo "end to end:"
for run in 1 2 3; do
  "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" \
    --cpu-of "nats-server=$pid_nats,dispatcher=$pid_dispatcher,worker=$pid_worker" embed --corpus "$corpus" --texts-per-job "$texts_per_job"
done
