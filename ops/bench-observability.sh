#!/usr/bin/env bash
# What observability costs, end to end (release build): the corpus through nats-server, one
# dispatcher and one worker by request-reply (`loadtest embed`, as ops/bench-e2e.sh), in three
# modes: `off` (RUST_LOG=warn, nothing shipped), `logs` (RUST_LOG=info, JSON lines, a span per
# job, nothing shipped) and `on` (the same, every admission audited, everything shipped to an
# Elasticsearch-API server, osmem-server on loopback). Rounds rotate which mode goes first; the
# fleet is restarted for each run so all start alike. Prints one JSON line per run (texts/s and CPU per text of each
# process, osmem-server's included: on a real deployment it runs elsewhere).
# Usage: ops/bench-observability.sh [rounds] [texts]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
texts=${2:-2048}
in_flight=512
corpus="$root/fixtures/corpus.jsonl"
"$root/ops/install-deps.sh"
model="$root/models/all-MiniLM-L6-v2"

# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
build_fleet
start_nats
bench_tenant
start_osmem

# Starts a dispatcher and a worker in MODE (off, logs or on), waits for a first answer.
start_fleet() {
  local mode=$1 log=warn
  local -a ship=()
  case "$mode" in
    logs) log=info ship=(--log-format json) ;;
    on) log=info ship=(--log-format json --log-es-url "$es_url") ;;
  esac
  RUST_LOG=$log spawn "dispatcher-$mode" "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" \
    --metrics-addr 127.0.0.1:0 "${ship[@]}"
  RUST_LOG=$log spawn "worker-$mode" "$bin/worker" --nats-url "$url" --tenants "$work/tenants.toml" \
    --model-dir "$model" --metrics-addr 127.0.0.1:0 --max-batch-size 32 --max-in-flight "$in_flight" \
    --max-ack-pending $((in_flight * 2)) --max-delay 5ms "${ship[@]}"
  wait_first_answer || { echo "(the fleet in mode $mode)" >&2; return 1; }
}

stop_fleet() {
  local mode=$1 pid
  for pid in $(eval echo "\$pid_worker_$mode \$pid_dispatcher_$mode"); do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

run() {
  local mode=$1
  start_fleet "$mode"
  local dispatcher worker
  dispatcher=$(eval echo "\$pid_dispatcher_$mode")
  worker=$(eval echo "\$pid_worker_$mode")
  "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" \
    --cpu-of "nats-server=$pid_nats,dispatcher=$dispatcher,worker=$worker,osmem-server=$pid_osmem" \
    embed --corpus "$corpus" --limit "$texts" | sed "s/^{/{\"mode\":\"$mode\",\"load\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",/"
  stop_fleet "$mode"
}

orders=("off logs on" "logs on off" "on off logs")
for round in $(seq "$rounds"); do
  for mode in ${orders[$(((round - 1) % 3))]}; do run "$mode"; done
done
lines=$(curl -s "$es_url/fleet-*/_count" | sed -n 's/.*"count": *\([0-9]*\).*/\1/p')
echo "{\"shipped_documents\": ${lines:-null}}"
