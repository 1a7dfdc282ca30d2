#!/usr/bin/env bash
# End-to-end throughput with the result cache off and on, in one run (release build): a corpus
# of TEXTS texts of which REPEATED percent are copies of texts sent at least SPREAD jobs earlier
# (default: one in-flight window, so the first copy has normally been answered and cached; 0:
# anywhere after it, often still in flight, then both are computed), one text per job,
# request-reply (`loadtest embed`) through nats-server, one dispatcher and one worker. Each run gets a fresh fleet (nats-server, dispatcher, worker),
# so the cache starts empty; rounds alternate which mode goes first. Prints one JSON line per
# run (loadtest's, with the mode, the load average and the worker's cache lookups) and a summary.
# Usage: ops/bench-result-cache.sh [rounds] [texts] [repeated percent] [in flight] [spread]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-2}
texts=${2:-2048}
repeated=${3:-30}
in_flight=${4:-512}
spread=${5:-$in_flight}
"$root/ops/install-deps.sh"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
build_fleet
model="$root/models/all-MiniLM-L6-v2"
bench_tenant

corpus="$work/corpus.jsonl"
python3 - "$root/fixtures/corpus.jsonl" "$corpus" "$texts" "$repeated" "$spread" <<'EOF'
import json, random, sys
source, out = sys.argv[1], sys.argv[2]
total, percent, spread = (int(arg) for arg in sys.argv[3:6])
texts = [json.loads(line)["text"] for line in open(source)]
repeats = total * percent // 100
unique = iter(texts[: total - repeats])
assert len(texts) >= total - repeats, "the fixture corpus is too small"
rng = random.Random(6)
# A repeat at position i copies one of the texts at positions below i - spread.
first = spread + 1
assert total - first >= repeats, "spread too long for this many repeats"
repeat_at = set(rng.sample(range(first, total), repeats))
rows = []
for i in range(total):
    rows.append(rng.choice(rows[: i - spread]) if i in repeat_at else next(unique))
with open(out, "w") as f:
    for i, text in enumerate(rows):
        f.write(json.dumps({"id": i, "text": text}) + "\n")
EOF
# A text outside the corpus, so the warm-up leaves nothing in the cache that the run could hit.
warmup="$work/warmup.jsonl"
echo '{"id": 0, "text": "warm up the fleet"}' >"$warmup"

run() {
  local mode=$1 name=$2 addr line dispatcher worker nats
  start_nats "nats-$name"
  nats=$(eval echo "\$pid_nats_${name//-/_}")
  RUST_LOG=warn spawn "dispatcher-$name" "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" \
    --metrics-addr 127.0.0.1:0
  RUST_LOG=warn,fleet_service::http=info spawn "worker-$name" "$bin/worker" --nats-url "$url" \
    --tenants "$work/tenants.toml" --model-dir "$model" --metrics-addr 127.0.0.1:0 --log-format text \
    --max-batch-size 32 --max-in-flight "$in_flight" --max-ack-pending $((in_flight * 2)) --max-delay 5ms \
    --result-cache "$mode"
  dispatcher=$(eval echo "\$pid_dispatcher_${name//-/_}")
  worker=$(eval echo "\$pid_worker_${name//-/_}")
  addr=$(wait_announced "worker-$name" 's/.*serving \/metrics.*local_addr=\([0-9.:]*\).*/\1/p')
  wait_first_answer "$warmup"
  line=$("$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" \
    --cpu-of "nats-server=$nats,dispatcher=$dispatcher,worker=$worker" \
    embed --corpus "$corpus")
  # The worker's cache counters, as "hit":N,"miss":N,...
  local counts
  counts=$(curl -s "http://$addr/metrics" |
    sed -n 's/^fleet_worker_result_cache_\(lookups\|stores\)_total{.*outcome="\([a-z]*\)"} \([0-9]*\).*/"\2":\3/p' | paste -sd, -)
  echo "$line" | sed "s/^{/{\"mode\":\"$mode\",\"round\":\"$name\",\"load\":\"$(cut -d' ' -f1-3 \/proc\/loadavg)\",\"cache\":{$counts},/"
  for pid in "$worker" "$dispatcher" "$nats"; do
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

results="$work/results.jsonl"
for round in $(seq "$rounds"); do
  if ((round % 2)); then order=(off tenant); else order=(tenant off); fi
  for mode in "${order[@]}"; do
    run "$mode" "$mode-$round" | tee -a "$results"
  done
done
python3 - "$results" "$repeated" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by = {mode: [r["texts_per_s"] for r in runs if r["mode"] == mode] for mode in ("off", "tenant")}
for mode, rates in by.items():
    print(f"{mode}: texts/s {' / '.join(f'{r:.1f}' for r in rates)} (median {statistics.median(rates):.1f})")
ratio = statistics.median(by["tenant"]) / statistics.median(by["off"])
print(f"cache on / off: {ratio:.2f} with {sys.argv[2]}% repeated texts")
EOF
