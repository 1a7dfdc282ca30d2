#!/usr/bin/env bash
# Checks the units with `systemd-analyze verify` (systemd 252 here), failing on any warning
# (verify itself exits 0 on an unknown key). The binaries need not be installed: ExecStart's
# /usr/local/bin/ is pointed at a stand-in for the check.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin"
for bin in dispatcher worker; do ln -s /bin/true "$tmp/bin/$bin"; done
sed "s|/usr/local/bin/|$tmp/bin/|g" "$here/dispatcher.service" >"$tmp/fleet-dispatcher.service"
sed "s|/usr/local/bin/|$tmp/bin/|g" "$here/worker@.service" >"$tmp/fleet-worker@.service"
cp "$tmp/fleet-worker@.service" "$tmp/fleet-worker@0.service"
out=$(cd "$tmp" && systemd-analyze verify fleet-dispatcher.service fleet-worker@0.service 2>&1) || { echo "$out"; exit 1; }
[ -z "$out" ] || { echo "$out"; exit 1; }
echo "ok: dispatcher.service, worker@.service (systemd-analyze verify, no warnings)"
