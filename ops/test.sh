#!/usr/bin/env bash
# The whole test suite. Installs what the tests need (nats-server, the model), builds the
# workspace's binaries (end-to-end tests start them as processes), then runs every test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
"$root/ops/install-deps.sh"
cargo build --workspace --bins
cargo test --workspace
