#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz: libFuzzer, AddressSanitizer, debug assertions) of the
# strict decoding of envelopes and jobs and of the dispatcher's admission of signed jobs (the
# fuzz/ crate: targets envelope, job, admission): each target runs for the given number of
# seconds (default 60), starting from the committed seeds in fuzz/seeds/<target>/ and, when a
# corpus folder is given, from what earlier runs kept there (new inputs are added to
# <corpus>/<target>/; without one they are thrown away at the end). A crash (panic,
# sanitizer report, slow input, memory limit) fails the script; the input that caused it is left
# in fuzz/artifacts/<target>/ (replay it, in fuzz/, with `cargo +nightly fuzz run <target> <file>`).
# Installs what it needs: rustup's minimal nightly toolchain and cargo-fuzz from crates.io.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
corpus=${2:-}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: ops/fuzz.sh [seconds-per-target [corpus-folder]]" >&2
  exit 2
fi
[ -z "$corpus" ] || corpus=$(mkdir -p "$corpus" && cd "$corpus" && pwd)
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd "$root/fuzz"
# One build of all targets first (2 to 5 minutes from clean on 2 cores), so its time is not
# charged to the first target's fuzzing and a build failure is reported as such.
build_start=$SECONDS
cargo +nightly fuzz build --debug-assertions --target-dir "$root/target/fuzz"
echo "build: $((SECONDS - build_start))s"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
for target in envelope job admission; do
  # New inputs go to the first corpus folder, never to the committed seeds.
  kept=${corpus:-$work}/$target
  mkdir -p "$kept"
  log="$work/$target.log"
  status=0
  cargo +nightly fuzz run --debug-assertions --target-dir "$root/target/fuzz" \
    "$target" "$kept" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  # libFuzzer's last progress line (executions, covered edges "cov", features "ft", corpus).
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  echo "$target: ${runs:-?} executions in ${seconds}s; last: ${last:-none}"
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "$target: FAILED (exit $status); the input is in fuzz/artifacts/$target/" >&2
    failed=1
  fi
done
exit "$failed"
