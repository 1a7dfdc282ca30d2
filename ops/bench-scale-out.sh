#!/usr/bin/env bash
# Scale-out, in one run (release build, loopback): the same load (the corpus by request-reply,
# `loadtest embed`) through one, then two, then three worker processes of one fleet (one
# nats-server, one dispatcher; each worker added to the running fleet once its model is
# loaded), with every process's CPU per text (`loadtest --cpu-of`). The machine's load
# (`uptime`) is printed before each figure. First, with one worker, a latency sweep (open
# loop, sync, texts drawn from the corpus) whose report goes to SWEEP_DIR when it is set.
# Usage: ops/bench-scale-out.sh [max workers] [rounds per count] [texts per job] [in flight]
# Environment: SWEEP_DIR (keep the sweep's report.json, report.md and plots there),
# SWEEP_ARGS (the sweep's flags, default below), NO_SWEEP=1 (skip the sweep).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
max_workers=${1:-3}
rounds=${2:-1}
texts_per_job=${3:-1}
in_flight=${4:-512}
sweep_args=${SWEEP_ARGS:---start 25 --step 25 --step-duration 8s --max-p99 500ms --max-steps 12}
corpus="$root/fixtures/corpus.jsonl"
"$root/ops/install-deps.sh"
model="$root/models/all-MiniLM-L6-v2"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
build_fleet
start_nats
bench_tenant
RUST_LOG=warn spawn dispatcher "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cpu_of="nats-server=$pid_nats,dispatcher=$pid_dispatcher"
ports=()
# Starts worker N (the same settings for every worker, as a shared consumer requires) and
# waits until its /ready says its model is loaded and it is pulling.
add_worker() {
  local n=$1 port pid
  port=$(free_port)
  RUST_LOG=warn spawn "worker-$n" "$bin/worker" --nats-url "$url" --tenants "$work/tenants.toml" --model-dir "$model" \
    --metrics-addr "127.0.0.1:$port" --worker-name "worker-$n" \
    --max-in-flight "$in_flight" --max-ack-pending $((in_flight * 2))
  pid_var="pid_worker_$n"
  pid=${!pid_var}
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$work/worker-$n.log" >&2; exit 1; }
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null || { echo "worker-$n never became ready" >&2; exit 1; }
  cpu_of="$cpu_of,worker-$n=$pid"
  ports+=("$port")
}

# Texts each worker has embedded so far (the sum of its batch sizes), one line per worker.
texts_per_worker() {
  local port
  for port in "${ports[@]}"; do
    curl -sf "http://127.0.0.1:$port/metrics" | awk '$1 ~ /^fleet_worker_batch_inputs_sum/ { print $2 }'
  done
}

add_worker 1
# Warm-up: the first answer proves the dispatcher and the worker are ready end to end.
wait_first_answer

if [ "${NO_SWEEP:-0}" != 1 ]; then
  echo "sweep, 1 worker: $(uptime)"
  sweep_dir=${SWEEP_DIR:-$work/sweep}
  # shellcheck disable=SC2086 # SWEEP_ARGS is a list of flags
  "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --cpu-of "$cpu_of" \
    sweep --corpus "$corpus" --texts-per-job "$texts_per_job" $sweep_args --report-dir "$sweep_dir" 2>"$work/sweep-steps.log" >/dev/null
  cat "$sweep_dir/report.md"
fi

for workers in $(seq "$max_workers"); do
  [ "$workers" = 1 ] || add_worker "$workers"
  for round in $(seq "$rounds"); do
    echo "$workers worker(s), round $round: $(uptime)"
    texts_per_worker >"$work/texts-before"
    "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" --cpu-of "$cpu_of" \
      embed --corpus "$corpus" --texts-per-job "$texts_per_job" >"$work/round.json"
    texts_per_worker >"$work/texts-after"
    # Adds the worker count, and each worker's texts and CPU per text it embedded itself
    # (loadtest's figure is per text of the whole round).
    python3 - "$workers" "$work/round.json" "$work/texts-before" "$work/texts-after" <<'PY'
import json, sys
workers = int(sys.argv[1])
report = json.load(open(sys.argv[2]))
before = [float(x) for x in open(sys.argv[3]).read().split()]
after = [float(x) for x in open(sys.argv[4]).read().split()]
report["workers"] = workers
cpu = report["cpu_us_per_text"]
own = {}
for i, (b, a) in enumerate(zip(before, after), start=1):
    texts = a - b
    name = f"worker-{i}"
    own[name] = {"texts": int(texts),
                 "cpu_ms_per_own_text": round(cpu[name] * report["texts"] / texts / 1000, 2) if texts else None}
report["per_worker"] = own
report["workers_cpu_ms_per_text"] = round(sum(cpu[f"worker-{i}"] for i in range(1, workers + 1)) / 1000, 2)
print(json.dumps(report))
PY
  done
done
