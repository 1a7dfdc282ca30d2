#!/usr/bin/env bash
# The long chaos run (tests/tests/chaos.rs with FLEET_CHAOS_LONG=1): more jobs and more rounds
# of faults than the short run in ops/test.sh, one scenario at a time, on real nats-server,
# dispatcher and worker processes. Prints the table RELIABILITY.md holds and the failover
# figures; exits non-zero when any scenario lost, stored twice, answered twice or stranded a
# job (the table is printed either way).
#
#   ops/chaos.sh                         # this checkout's binaries
#   ops/chaos.sh --worker path/to/worker # another build's worker (an older commit, to compare)
#   ops/chaos.sh -- <filter>             # only the scenarios whose test name contains <filter>
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
filter=()
while [ $# -gt 0 ]; do
  case "$1" in
    --worker) export FLEET_CHAOS_WORKER=$(realpath "$2"); shift 2 ;;
    --) shift; filter=("$@"); break ;;
    *) echo "usage: $0 [--worker PATH] [-- FILTER]" >&2; exit 2 ;;
  esac
done
"$root/ops/install-deps.sh"
cargo build --workspace --bins
# Kept for a look at the processes' errors and the reasons of failed rows.
log="${CARGO_TARGET_DIR:-$root/target}/chaos-long.log"
status=0
started=$(date +%s)
FLEET_CHAOS_LONG=1 cargo test -p fleet-tests --test chaos -- --nocapture --test-threads 1 \
  "${filter[@]}" >"$log" 2>&1 || status=$?
echo
worker=${FLEET_CHAOS_WORKER:-the checkout}
echo "Long chaos run, $(date -u +%Y-%m-%d), $(nproc) cores, $(( $(date +%s) - started )) s," \
  "worker: $worker"
echo
echo "| scenario | jobs sent | stored once | lost | stored twice | answered twice | unanswered | failed | left on the queue | drain (s) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
grep '^| ' "$log" || true
echo
grep '^failover:' "$log" || true
grep -E ': [0-9]+ results not ok|; left: ' "$log" || true
grep -E '^test result:' "$log" || tail -n 40 "$log"
echo "full log: $log"
exit "$status"
