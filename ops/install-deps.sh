#!/usr/bin/env bash
# Installs what Fleet needs at run and test time on a Debian machine: nats-server, and the model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v nats-server >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nats-server >/dev/null
fi
"$root/ops/fetch-model.sh"
