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
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check msgpack cryptography
"$venv/bin/python" schemas/tests/python_client.py
cargo build --workspace --bins
cargo test --workspace
