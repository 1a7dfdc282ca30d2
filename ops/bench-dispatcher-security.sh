#!/usr/bin/env bash
# What TLS and authentication cost the dispatcher's intake: accepted jobs/s through one
# dispatcher under the shipped broker config (TLS with client certificates, nkey users, the
# tenant in its own account, per-role permissions) against one dispatcher on a nats-server
# without TLS or users, in one run, rounds alternating which goes first (release build,
# loopback). Both brokers and dispatchers run throughout; each round submits to one at a time.
# Usage: ops/bench-dispatcher-security.sh [jobs per round] [in flight] [rounds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
jobs=${1:-20000}
in_flight=${2:-256}
rounds=${3:-6}
"$root/ops/install-deps.sh"
cargo build --quiet --release -p fleet-dispatcher -p fleet-client -p fleet-loadtest --bins
bin="${CARGO_TARGET_DIR:-$root/target}/release"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
bench_tenant

start_nats nats-plain
plain_url=$url
spawn dispatcher-plain "$bin/dispatcher" --nats-url "$plain_url" --tenants "$work/tenants.toml" \
  --metrics-addr 127.0.0.1:0

mkdir -p "$work/nats"
"$bin/fleet" nats-user --role tenant --name bench --seed-out "$work/bench.nk" >>"$work/nats/users.list"
secure_nats_user dispatcher dispatcher-1
start_secure_nats nats-secure
secure_url=$url
spawn dispatcher-secure "$bin/dispatcher" --nats-url "$secure_url" \
  --nats-nkey-file "$work/dispatcher-1.nk" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0
for log in dispatcher-plain dispatcher-secure; do
  for _ in $(seq 100); do grep -q "dispatcher serving" "$work/$log.log" && break; sleep 0.1; done
  grep -q "dispatcher serving" "$work/$log.log" || { tail -n 20 "$work/$log.log" >&2; exit 1; }
done

round() { # setup
  local label=$1
  if [ "$label" = plain ]; then
    env -u NATS_TLS_CA -u NATS_TLS_CERT -u NATS_TLS_KEY \
      "$bin/loadtest" --nats-url "$plain_url" --key "$work/key.toml" --in-flight "$in_flight" \
      --cpu-of "nats-server=$pid_nats_plain,dispatcher=$pid_dispatcher_plain" \
      dispatch --jobs "$jobs" --rounds 1 --phases dispatcher
  else
    "$bin/loadtest" --nats-url "$secure_url" --nats-nkey-file "$work/bench.nk" --key "$work/key.toml" \
      --in-flight "$in_flight" --cpu-of "nats-server=$pid_nats_secure,dispatcher=$pid_dispatcher_secure" \
      dispatch --jobs "$jobs" --rounds 1 --phases dispatcher
  fi | sed "s/^{/{\"setup\":\"$label\",/" | tee -a "$work/results.jsonl"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then round plain; round secure; else round secure; round plain; fi
done

python3 - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def median(setup, key):
    return statistics.median(r[key] for r in rows if r["setup"] == setup)
plain, secure = median("plain", "jobs_per_s"), median("secure", "jobs_per_s")
print(f"median jobs/s: plain {plain:.0f}, TLS+auth {secure:.0f} (ratio {secure / plain:.2f})")
for who in ("dispatcher", "nats-server", "loadtest"):
    cpu = lambda setup: statistics.median(r["cpu_us_per_job"][who] for r in rows if r["setup"] == setup)
    print(f"median CPU µs/job, {who}: plain {cpu('plain'):.1f}, TLS+auth {cpu('secure'):.1f}")
PY
