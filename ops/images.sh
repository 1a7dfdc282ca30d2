#!/usr/bin/env bash
# Builds Fleet's container images locally (no registry is needed or reachable):
#
#   fleet-dispatcher   the dispatcher
#   fleet-worker       the CPU worker (model mounted at /models/all-MiniLM-L6-v2)
#   fleet              the command-line client
#   fleet-nats         nats-server 2.9.10 (Debian's), for ops/compose/
#
#   ops/images.sh [--tag TAG] [--no-build] [IMAGE ...]     # default: all four, tag `local`
#   ops/images.sh --context DIR IMAGE                       # stage one build context, no Docker
#
# Each image is FROM scratch: the release binary (stripped), exactly the shared libraries `ldd`
# lists (the same paths as on this Debian machine, the loader included), /etc/ssl/certs's CA
# bundle, and, for the services, a static busybox that runs the HEALTHCHECK (wget /health; the
# binaries have no probe mode of their own). One COPY layer each. Numeric non-root user 10001,
# exec-form ENTRYPOINT so that SIGTERM reaches the process (the worker drains). The Dockerfiles
# are in ops/docker/; the CUDA worker's (worker-cuda.Dockerfile) is not built here.
#
# Builds the binaries first (cargo build --release) unless --no-build (or FLEET_NO_BUILD=1):
# then the ones already in target/release are used. Staging goes to target/images/. Prints each
# image's size at the end; old dangling layers are pruned.
#
# --context DIR writes IMAGE's build context (rootfs/ and its Dockerfile, as DIR/Dockerfile) into
# DIR and builds nothing, for a builder of its own: the container cluster tests build fleet-nats
# through testcontainers from it (tests/src/containers.rs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tag=local
build=1
[ "${FLEET_NO_BUILD:-0}" != 1 ] || build=0
images=()
context=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --context) context=$2; shift 2 ;;
    -h|--help) sed -n "2,25p" "$0"; exit 0 ;;
    dispatcher|worker|fleet|nats) images+=("$1"); shift ;;
    *) echo "unknown image or option $1 (dispatcher, worker, fleet, nats)" >&2; exit 2 ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(dispatcher worker fleet nats)
if [ -n "$context" ] && [ ${#images[@]} -ne 1 ]; then
  echo "--context stages exactly one image" >&2
  exit 2
fi

if [ -z "$context" ]; then
  # shellcheck source=ops/docker-up.sh
  source "$root/ops/docker-up.sh"
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
missing=()
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || missing+=(busybox-static)
command -v nats-server >/dev/null || missing+=(nats-server)
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
command -v file >/dev/null || missing+=(file)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

need_cargo=0
for image in "${images[@]}"; do [ "$image" = nats ] || need_cargo=1; done
target="${CARGO_TARGET_DIR:-$root/target}"
if [ "$need_cargo" = 1 ] && [ "$build" = 1 ]; then
  cargo build --release --quiet -p fleet-dispatcher -p fleet-worker -p fleet-client --bins
fi

# Copies binary $2 to $1/rootfs/$3 (stripped) with every library ldd lists, at its own path.
stage_binary() { # context source dest
  local ctx=$1 src=$2 dest=$3 lib
  mkdir -p "$ctx/rootfs$(dirname "$dest")"
  cp "$src" "$ctx/rootfs$dest"
  strip --strip-all "$ctx/rootfs$dest" 2>/dev/null || true
  # `libx.so => /path (addr)` and the loader `/lib64/ld-linux-x86-64.so.2 (addr)`; vdso has no file.
  for lib in $(ldd "$src" | awk '/=>/ { if ($3 ~ /^\//) print $3; next } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
  done
}

stage() { # image context
  local image=$1 ctx=$2
  rm -rf "$ctx"
  mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
  # Names for the numeric user, for tools that look it up (the processes do not need them).
  printf 'root:x:0:0:root:/:/sbin/nologin\nfleet:x:10001:10001:fleet:/:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nfleet:x:10001:\n' >"$ctx/rootfs/etc/group"
  case "$image" in
    dispatcher|worker|fleet) stage_binary "$ctx" "$target/release/$image" "/usr/local/bin/$image" ;;
    nats) stage_binary "$ctx" "$(command -v nats-server)" /usr/sbin/nats-server ;;
  esac
  if [ "$image" != fleet ]; then
    mkdir -p "$ctx/rootfs/bin"
    cp /bin/busybox "$ctx/rootfs/bin/busybox"
  fi
  # The worker's model mount point, owned by nobody in particular (mounted read-only).
  [ "$image" != worker ] || mkdir -p "$ctx/rootfs/models"
  [ "$image" != fleet ] || { mkdir -p "$ctx/rootfs/work"; chmod 1777 "$ctx/rootfs/work"; }
}

if [ -n "$context" ]; then
  stage "${images[0]}" "$context"
  cp "$root/ops/docker/${images[0]}.Dockerfile" "$context/Dockerfile"
  exit 0
fi

for image in "${images[@]}"; do
  stage "$image" "$target/images/$image"
  name=fleet-$image
  [ "$image" != fleet ] || name=fleet
  echo "building $name:$tag" >&2
  $sudo "$DOCKER" build -q -f "$root/ops/docker/$image.Dockerfile" -t "$name:$tag" \
    --label org.opencontainers.image.revision="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$target/images/$image" >/dev/null
  rm -rf "$target/images/$image"
done
# A rebuild leaves the previous image dangling; with vfs each is a full copy on disk.
$sudo "$DOCKER" image prune -f >/dev/null
for image in "${images[@]}"; do
  name=fleet-$image
  [ "$image" != fleet ] || name=fleet
  $sudo "$DOCKER" image inspect -f "{{index .RepoTags 0}} {{.Size}}" "$name:$tag" |
    awk '{ printf "%-24s %6.1f MB\n", $1, $2 / 1e6 }'
done
