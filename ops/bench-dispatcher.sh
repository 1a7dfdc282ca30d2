#!/usr/bin/env bash
# Dispatcher intake benchmark: accepted jobs/s through one dispatcher into JetStream against raw
# JetStream async publishing from the same client, in one run (release build, loopback).
# Usage: ops/bench-dispatcher.sh [jobs per phase] [in flight]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
jobs=${1:-20000}
in_flight=${2:-256}
"$root/ops/install-deps.sh"
cargo build --quiet --release -p fleet-dispatcher -p fleet-client -p fleet-loadtest --bins
bin="${CARGO_TARGET_DIR:-$root/target}/release"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
start_nats
bench_tenant
spawn dispatcher "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0
for _ in $(seq 100); do grep -q "dispatcher serving" "$work/dispatcher.log" && break; sleep 0.1; done
"$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" \
  --cpu-of "nats-server=$pid_nats,dispatcher=$pid_dispatcher" dispatch --jobs "$jobs" --rounds 3 --purge-fleet-jobs
