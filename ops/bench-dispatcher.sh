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
"$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0 >"$work/dispatcher.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "dispatcher serving" "$work/dispatcher.log" && break; sleep 0.1; done
"$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight "$in_flight" dispatch --jobs "$jobs" --rounds 3
