#!/usr/bin/env bash
# The whole test suite. Installs what the tests need (nats-server, the model), builds the
# workspace's binaries (end-to-end tests start them as processes), then runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/ops/install-deps.sh"
# A client written from schemas/WIRE.md in another language must reproduce the test vectors.
venv="${CARGO_TARGET_DIR:-$root/target}/wire-check-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import msgpack, cryptography" 2>/dev/null ||
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check msgpack cryptography
"$venv/bin/python" schemas/tests/python_client.py
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
# The README's first command, as a user runs it: the shipped broker config with TLS and auth.
if ops/local-fleet.sh; then
  echo "test result: ok. 1 passed; 0 failed (ops/local-fleet.sh)" >>"$log"
else
  status=1
  echo "test result: FAILED. 0 passed; 1 failed (ops/local-fleet.sh)" | tee -a "$log"
fi
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
