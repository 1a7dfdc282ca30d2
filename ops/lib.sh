# Shared by the ops scripts that run a local fleet: a temporary work folder, background
# processes torn down on exit, and a loopback nats-server with JetStream. Source it.

work=$(mktemp -d)
pids=()
# Stops the processes last-started first (clients drain while their broker is still up), each
# given 10 s to exit before it is killed.
cleanup() {
  local i pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Builds the release binaries of the fleet and its tools; sets $bin to where they are.
build_fleet() {
  cargo build --quiet --release -p fleet-dispatcher -p fleet-worker -p fleet-client -p fleet-loadtest --bins
  bin="${CARGO_TARGET_DIR:-$root/target}/release"
}

# Waits (2 minutes at most) until the fleet at $url answers one text of the corpus $1 (default
# $corpus) for the tenant of $work/key.toml: the dispatcher and a worker, its model loaded, work
# end to end.
wait_first_answer() {
  for _ in $(seq 120); do
    "$bin/loadtest" --nats-url "$url" --key "$work/key.toml" --in-flight 1 embed --corpus "${1:-$corpus}" \
      --limit 1 --timeout 5s >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "the fleet did not answer within 2 minutes" >&2
  return 1
}

# Starts `name` (its output in $work/name.log) in the background, stopped on exit; its pid is
# in $pid_<name> (dashes become underscores).
spawn() {
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
  printf -v "pid_${name//-/_}" '%s' "$!"
}

# Starts nats-server (as process NAME, default `nats`) on a free loopback port with a temporary
# store and no authentication (benchmarks' baseline only); sets $url.
start_nats() {
  local name=${1:-nats}
  spawn "$name" nats-server -a 127.0.0.1 -p -1 -js -sd "$work/$name-jetstream"
  wait_nats "$name"
}

# Waits until the log of process NAME ($1) has a line the sed expression $2 prints (the address
# the process announces once it listens) and prints it; after 10 s, shows the log and fails.
wait_announced() {
  local found
  for _ in $(seq 100); do
    found=$(sed -n "$2" "$work/$1.log" | head -n 1)
    [ -n "$found" ] && { echo "$found"; return 0; }
    sleep 0.1
  done
  echo "$1 did not start:" >&2
  tail -n 20 "$work/$1.log" >&2
  return 1
}

# Waits for the nats-server started as process $1 to listen; sets $url.
wait_nats() {
  url=$(wait_announced "$1" 's/.*Listening for client connections on \(.*\)$/nats:\/\/\1/p')
}

# Adds a NATS user (ROLE NAME) to the secure broker's users.list; its nkey seed goes to
# $work/NAME.nk. Tenants are added by `fleet tenant add --nats-seed-out` instead.
secure_nats_user() {
  mkdir -p "$work/nats"
  "$bin/fleet" nats-user --role "$1" --name "$2" --seed-out "$work/$2.nk" >>"$work/nats/users.list"
}

# Starts nats-server with the shipped broker configuration (ops/nats/: TLS with client
# certificates, nkey users only, permissions per role) for the users added so far, on a free
# loopback port, with a development PKI in $work/pki; sets $url and exports the TLS settings
# every Fleet process and `fleet` reads (NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY). The
# process is NAME (default `nats`).
start_secure_nats() {
  local name=${1:-nats}
  "$root/ops/make-dev-pki.sh" --out "$work/pki" local >/dev/null
  "$root/ops/nats/render.sh" "$work/nats" --pki "$work/pki" --store "$work/jetstream"
  # The command line's address and port (-1: a free one) override the file's listen.
  spawn "$name" nats-server -c "$work/nats/fleet.conf" -a 127.0.0.1 -p -1
  export NATS_TLS_CA="$work/pki/ca.pem" NATS_TLS_CERT="$work/pki/client-local.pem" \
    NATS_TLS_KEY="$work/pki/client-local-key.pem"
  wait_nats "$name"
}

# A tenant `bench` whose rate limit never binds: its key in $work/key.toml, the tenants file in
# $work/tenants.toml.
bench_tenant() {
  "$bin/fleet" keygen --tenant bench --key-id bench-1 --out "$work/key.toml" 2>/dev/null |
    sed 's/rate_per_second = 100/rate_per_second = 1000000/; s/burst = 200/burst = 1000000/' >"$work/tenants.toml"
}

# Starts osmem-server, an Elasticsearch-API server (ops/install-osmem.sh installs it), as process
# `osmem` on a free loopback port; sets $es_url.
start_osmem() {
  local osmem
  osmem=$("$root/ops/install-osmem.sh" 2>/dev/null)
  spawn osmem "$osmem" -addr 127.0.0.1:0 -no-stdin-watch -no-ja
  es_url=$(wait_announced osmem 's/.*"url": *"\([^"]*\)".*/\1/p')
}
