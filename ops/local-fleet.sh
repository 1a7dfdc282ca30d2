#!/usr/bin/env bash
# Brings up a local fleet (nats-server with JetStream, one dispatcher, one worker on the real
# all-MiniLM-L6-v2) on loopback, embeds sample texts through request-reply, prints the first
# dimensions and the time taken, and tears everything down. Installs what is missing.
#
# Secure as shipped: the broker runs the configuration of ops/nats/ (TLS with client
# certificates from a development CA, nkey users, permissions per role), the demo tenant's
# signing key and NATS credentials are made by `fleet tenant add`, and every process reads its
# secrets from files. There is no insecure mode.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/ops/install-deps.sh"
cargo build --quiet -p fleet-dispatcher -p fleet-worker -p fleet-client --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
fail() {
  echo "local fleet failed: $1" >&2
  for log in "$work"/*.log; do echo "--- $log" >&2; tail -n 20 "$log" >&2; done
  exit 1
}

mkdir -p "$work/nats"
"$bin/fleet" tenant --tenants "$work/tenants.toml" add --tenant demo --key-id demo-1 \
  --out "$work/demo-key.toml" --nats-seed-out "$work/demo.nk" >>"$work/nats/users.list" 2>/dev/null
secure_nats_user dispatcher dispatcher-1
secure_nats_user worker worker-1
start_secure_nats || fail "nats-server did not start"
echo "nats-server on $url (TLS with client certificates, nkey users, per-role permissions: ops/nats/)"

spawn dispatcher "$bin/dispatcher" --nats-url "$url" --nats-nkey-file "$work/dispatcher-1.nk" \
  --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0
spawn worker "$bin/worker" --nats-url "$url" --nats-nkey-file "$work/worker-1.nk" \
  --tenants "$work/tenants.toml" --model-dir "$root/models/all-MiniLM-L6-v2" --metrics-addr 127.0.0.1:0

texts=(
  "NATS JetStream redelivers a job that a worker took and never acknowledged."
  "The quick brown fox jumps over the lazy dog."
  "Fleet batches texts from many jobs into one forward pass."
)
args=()
for t in "${texts[@]}"; do args+=(--text "$t"); done

# The first answers may be rejections while the worker is still loading the model; retry briefly.
deadline=$((SECONDS + 120))
while :; do
  start=$(date +%s%N)
  if answer=$("$bin/fleet" infer --nats-url "$url" --nats-nkey-file "$work/demo.nk" --key "$work/demo-key.toml" --timeout-secs 10 "${args[@]}" 2>"$work/infer.log"); then
    end=$(date +%s%N)
    break
  fi
  [ $SECONDS -lt $deadline ] || fail "no embedding within 120 s: $(cat "$work/infer.log")"
  sleep 1
done

ANSWER="$answer" ELAPSED_MS=$(((end - start) / 1000000)) python3 - "${texts[@]}" <<'PY'
import json, os, sys
result = json.loads(os.environ["ANSWER"])
vectors = result["output"]["vectors"]
print(f"job {result['job_id']} embedded by {result['worker']} in {int(os.environ['ELAPSED_MS'])} ms "
      f"(queue {result['timings']['queue_ms']} ms, inference {result['timings']['inference_ms']} ms)")
for text, vector in zip(sys.argv[1:], vectors):
    head = ", ".join(f"{x:+.4f}" for x in vector[:6])
    print(f"  [{head}, ...] ({len(vector)} dims)  {text}")
PY
