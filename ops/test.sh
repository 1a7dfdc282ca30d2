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
# The container tests start a Docker daemon when none answers (ops/docker-up.sh); one started
# by this run is stopped at its end.
docker_was_up=0
/usr/bin/docker version >/dev/null 2>&1 && docker_was_up=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
# The README's first command, as a user runs it (the shipped broker config with TLS and auth),
# with Prometheus scraping the fleet it brought up.
if ops/local-fleet.sh --observe 1; then
  echo "test result: ok. 1 passed; 0 failed (ops/local-fleet.sh)" >>"$log"
else
  status=1
  echo "test result: FAILED. 0 passed; 1 failed (ops/local-fleet.sh)" | tee -a "$log"
fi
# The Python client package (clients/python): unit tests, and integration tests against a local
# fleet of the binaries built above under the shipped broker configuration. Counted like the rest.
pyvenv="${CARGO_TARGET_DIR:-$root/target}/python-client-venv"
pylog=$(mktemp)
trap 'rm -f "$log" "$pylog"' EXIT
[ -x "$pyvenv/bin/python" ] || python3 -m venv "$pyvenv"
if "$pyvenv/bin/python" -m pip install --quiet --disable-pip-version-check "./clients/python[test]"; then
  FLEET_REQUIRE_FLEET=1 FLEET_BIN_DIR="${CARGO_TARGET_DIR:-$root/target}/debug" \
    "$pyvenv/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests 2>&1 | tee "$pylog" || true
else
  echo "pip install ./clients/python[test] failed" | tee "$pylog"
fi
summary=$(grep -E '^=* *[0-9]+ (passed|failed|error)' "$pylog" | tail -n 1 || true)
py_passed=$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)
py_failed=$(($(grep -oE '[0-9]+ (failed|errors?)' <<<"$summary" | grep -oE '[0-9]+' | paste -sd+ - || echo 0) + 0))
if [ "$py_failed" -eq 0 ] && [ "$py_passed" -gt 0 ]; then
  echo "test result: ok. $py_passed passed; 0 failed (clients/python)" >>"$log"
else
  status=1
  [ "$py_failed" -gt 0 ] || py_failed=1
  echo "test result: FAILED. $py_passed passed; $py_failed failed (clients/python)" | tee -a "$log"
fi
# Kubernetes manifests against the Kubernetes and KEDA schemas (strict): prints its own line.
ops/check-k8s.sh | tee -a "$log" | grep -v '^ok ' || status=1
if [ "$docker_was_up" = 0 ] && [ -f /var/run/docker.pid ]; then
  kill "$(cat /var/run/docker.pid)" 2>/dev/null || true
fi
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
