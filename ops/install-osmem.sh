#!/usr/bin/env bash
# Installs osmem-server (an in-memory server speaking the Elasticsearch/OpenSearch REST API:
# _bulk, index templates, _search, _count; the log-shipping tests start it) from the PyPI package
# osmem-server into a virtual environment under target/. Idempotent: does nothing when the
# binary is there and runs. Prints the binary's path.
#
# The wheel bundles a static binary and a Python launcher; the binary itself is what the tests
# run (tests/src/elasticsearch.rs finds it at this path, or at $FLEET_OSMEM).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${CARGO_TARGET_DIR:-$root/target}/osmem-venv"
version="0.1.6"
find_binary() {
  "$venv/bin/python" -c 'import osmem_server; print(osmem_server.resolve_binary())' 2>/dev/null
}
if bin=$(find_binary) && [ -x "$bin" ] && "$bin" -version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "osmem-server==$version"
bin=$(find_binary)
# Some installers drop the executable bit of package data.
chmod +x "$bin"
"$bin" -version >&2
echo "$bin"
