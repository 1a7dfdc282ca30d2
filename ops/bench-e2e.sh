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
corpus="$root/../shared/bench/corpus.jsonl"
"$root/ops/install-deps.sh"
cargo build --quiet --release -p fleet-dispatcher -p fleet-worker -p fleet-client -p fleet-loadtest --bins
cargo build --quiet --release -p fleet-model --example throughput
bin="${CARGO_TARGET_DIR:-$root/target}/release"
model="$root/models/all-MiniLM-L6-v2"

echo "in-process:"
"$bin/examples/throughput" --model "$model" --corpus "$corpus" --batch "$batch" --runs 3

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
nats-server -a 127.0.0.1 -p -1 -js -sd "$work/jetstream" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  url=$(sed -n 's/.*Listening for client connections on \(.*\)$/nats:\/\/\1/p' "$work/nats.log" | head -n 1)
  [ -n "$url" ] && break
  sleep 0.1
done
"$bin/fleet" keygen --tenant bench --key-id bench-1 --out "$work/key.toml" 2>/dev/null |
  sed 's/rate_per_second = 100/rate_per_second = 1000000/; s/burst = 200/burst = 1000000/' >"$work/tenants.toml"
RUST_LOG=warn "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0 >"$work/dispatcher.log" 2>&1 &
pids+=($!)
RUST_LOG=warn "$bin/worker" --nats-url "$url" --model-dir "$model" --metrics-addr 127.0.0.1:0 \
  --max-batch-size "$batch" --max-in-flight "$in_flight" --max-ack-pending $((in_flight * 2)) \
  --max-delay-ms 5 >"$work/worker.log" 2>&1 &
pids+=($!)
# Warm-up: the first answer proves the dispatcher and the worker (with its model) are ready.
for _ in $(seq 120); do
  "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight 1 embed --corpus "$corpus" --limit 1 --timeout-secs 5 >/dev/null 2>&1 && break
  sleep 1
done
echo "end to end:"
for run in 1 2 3; do
  "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" \
    embed --corpus "$corpus" --texts-per-job "$texts_per_job"
done
