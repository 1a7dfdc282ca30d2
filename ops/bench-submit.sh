#!/usr/bin/env bash
# Bulk submit against the best the fleet does, in one run (release build, loopback): the corpus
# through `fleet submit` (resumable bulk, results read from FLEET_RESULTS) and through
# `loadtest embed` (request-reply, the same texts per job and jobs in flight), rounds
# alternating which goes first; `fleet submit`'s peak RSS from /usr/bin/time. Each submit round
# gets row ids of its own, so no round reads another's stored results.
# Usage: ops/bench-submit.sh [texts per job] [jobs in flight] [rounds] [rows]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
texts_per_job=${1:-32}
in_flight=${2:-64}
rounds=${3:-2}
rows=${4:-0}
corpus="$root/fixtures/corpus.jsonl"
"$root/ops/install-deps.sh"
model="$root/models/all-MiniLM-L6-v2"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
build_fleet
start_nats
bench_tenant
RUST_LOG=warn spawn dispatcher "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0
RUST_LOG=warn spawn worker "$bin/worker" --nats-url "$url" --tenants "$work/tenants.toml" --model-dir "$model" --metrics-addr 127.0.0.1:0
wait_first_answer
# The corpus, repeated to `rows` rows when asked.
python3 - "$corpus" "$work/rows.jsonl" "$rows" <<'PY'
import json, sys
texts = [json.loads(line)["text"] for line in open(sys.argv[1]) if line.strip()]
wanted = int(sys.argv[3]) or len(texts)
with open(sys.argv[2], "w") as out:
    for i in range(wanted):
        out.write(json.dumps({"id": i, "text": texts[i % len(texts)]}) + "\n")
PY
total=$(wc -l <"$work/rows.jsonl")
loadtest_round() {
  "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" \
    embed --corpus "$work/rows.jsonl" --texts-per-job "$texts_per_job"
}
submit_round() { # round
  sed "s/^{\"id\": /{\"id\": \"r$1-/; s/, \"text\"/\", \"text\"/" "$work/rows.jsonl" >"$work/rows-$1.jsonl"
  local started=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$work/rss-$1" "$bin/fleet" submit --nats-url "$url" --key "$work/key.toml" \
    --input "$work/rows-$1.jsonl" --output "$work/out-$1.jsonl" \
    --texts-per-job "$texts_per_job" --in-flight "$in_flight" 2>"$work/submit-$1.log"
  local ended=$(date +%s.%N)
  python3 -c "import json,sys; s=float(sys.argv[2])-float(sys.argv[1]); print(json.dumps({'bench':'fleet_submit','rows':int(sys.argv[3]),'texts_per_job':int(sys.argv[4]),'in_flight':int(sys.argv[5]),'seconds':s,'rows_per_s':int(sys.argv[3])/s,'peak_rss_mib':int(sys.argv[6])/1024}))" \
    "$started" "$ended" "$total" "$texts_per_job" "$in_flight" "$(cat "$work/rss-$1")"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then loadtest_round; submit_round "$r"; else submit_round "$r"; loadtest_round; fi
done
