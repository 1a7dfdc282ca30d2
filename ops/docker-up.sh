#!/usr/bin/env bash
# Makes sure a Docker daemon is up on this machine, and says which client to use with it.
# Idempotent: installs Debian's docker.io (and docker-compose) only if missing, starts dockerd
# only if no daemon answers, waits for it.
#
#   ops/docker-up.sh            # prints the docker client's path on stdout (for DOCKER=...)
#   source ops/docker-up.sh     # sets and exports DOCKER (the client) in the caller
#
# The daemon runs as root with no bridge and no iptables rules (the only network here is
# loopback): `dockerd --storage-driver=vfs --bridge=none --iptables=false`. Containers must
# run with `--network host` (compose: `network_mode: host`). Its log is in
# ${DOCKERD_LOG:-/var/log/fleet-dockerd.log}.
#
# FLEET_DOCKER_INSTALL=0: fail instead of installing packages (the tests start the daemon but
# leave installing to ops/install-deps.sh).
#
# The client is Debian's /usr/bin/docker when present (it matches the daemon Debian installs);
# another client found first on PATH (a newer one, whose `docker build` wants buildx) is not
# used.
_docker_up() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  if [ "${FLEET_DOCKER_INSTALL:-1}" = 0 ]; then
    # The tests need the daemon and the client, not compose.
    if [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/bin/docker ]; then
      echo "docker.io is not installed (ops/install-deps.sh installs it)" >&2
      return 1
    fi
  elif [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/bin/docker ] || ! command -v docker-compose >/dev/null; then
    echo "installing docker.io and docker-compose (Debian packages)" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose >&2 ||
      { $sudo apt-get update -q >&2 &&
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose >&2; } ||
      { echo "could not install docker.io" >&2; return 1; }
  fi
  DOCKER=/usr/bin/docker
  export DOCKER
  # The legacy builder: the daemon is 20.10 and there is no buildx plugin.
  export DOCKER_BUILDKIT=0
  if $sudo "$DOCKER" version >/dev/null 2>&1; then
    return 0
  fi
  # Without a terminal (a test) nobody can type sudo's password: say so rather than wait.
  if [ -n "$sudo" ] && [ ! -t 0 ] && ! sudo -n true 2>/dev/null; then
    echo "no Docker daemon answers, and starting one needs root (sudo asks for a password)" >&2
    return 1
  fi
  local log=${DOCKERD_LOG:-/var/log/fleet-dockerd.log}
  echo "starting dockerd (vfs storage, no bridge, no iptables; log: $log)" >&2
  # setsid: the daemon outlives this script and is not in its process group.
  $sudo setsid /usr/sbin/dockerd --storage-driver=vfs --bridge=none --iptables=false \
    >>"$log" 2>&1 </dev/null &
  local _
  for _ in $(seq 120); do
    if $sudo "$DOCKER" version >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  echo "dockerd did not answer within 60 s:" >&2
  tail -n 20 "$log" >&2
  return 1
}
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  _docker_up
  echo "$DOCKER"
else
  _docker_up
fi
