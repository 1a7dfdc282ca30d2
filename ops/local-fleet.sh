#!/usr/bin/env bash
# Brings up a local fleet (nats-server with JetStream, one dispatcher, one worker on the real
# all-MiniLM-L6-v2) on loopback, embeds sample texts through request-reply, prints the first
# dimensions and the time taken, and tears everything down. Installs what is missing.
#
# Secure as shipped: the broker runs the configuration of ops/nats/ (TLS with client
# certificates from a development CA, nkey users, permissions per role), the demo tenant's
# signing key and NATS credentials are made by `fleet tenant add`, and every process reads its
# secrets from files. There is no insecure mode.
#
#   ops/local-fleet.sh [--observe [SECONDS]]
#
# --observe keeps the fleet up afterwards (for SECONDS, default until Ctrl-C) with Prometheus
# scraping it under the shipped alert rules (ops/observability/) and every process shipping its
# logs and audit events to an Elasticsearch-API server (osmem-server), checks that Prometheus
# sees both processes and that the job's story reached the log server, and prints where to look.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
observe=""
case "${1:-}" in
  "") ;;
  --observe) observe=${2:-forever} ;;
  *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
[[ "$observe" =~ ^([0-9]+|forever|)$ ]] || { echo "--observe takes a number of seconds" >&2; exit 2; }
"$root/ops/install-deps.sh"
cargo build --quiet -p fleet-dispatcher -p fleet-worker -p fleet-client --bins
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
fail() {
  echo "local fleet failed: $1" >&2
  for log in "$work"/*.log; do echo "--- $log" >&2; tail -n 20 "$log" >&2; done
  exit 1
}

mkdir -p "$work/nats"
"$bin/fleet" tenant --tenants "$work/tenants.toml" add --tenant demo --key-id demo-1 \
  --out "$work/demo-key.toml" --nats-seed-out "$work/demo.nk" >>"$work/nats/users.list" 2>/dev/null
secure_nats_user dispatcher dispatcher-1
secure_nats_user worker worker-1
start_secure_nats || fail "nats-server did not start"
echo "nats-server on $url (TLS with client certificates, nkey users, per-role permissions: ops/nats/)"

# Observed: logs and audit events shipped from the start, so the first job's story is there.
ship=()
if [ -n "$observe" ]; then
  start_osmem || fail "osmem-server did not start"
  ship=(--log-es-url "$es_url")
fi

spawn dispatcher "$bin/dispatcher" --nats-url "$url" --nats-nkey-file "$work/dispatcher-1.nk" \
  --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0 "${ship[@]}"
spawn worker "$bin/worker" --nats-url "$url" --nats-nkey-file "$work/worker-1.nk" \
  --tenants "$work/tenants.toml" --model-dir "$root/models/all-MiniLM-L6-v2" --metrics-addr 127.0.0.1:0 \
  "${ship[@]}"

texts=(
  "NATS JetStream redelivers a job that a worker took and never acknowledged."
  "The quick brown fox jumps over the lazy dog."
  "Fleet batches texts from many jobs into one forward pass."
)
args=()
for t in "${texts[@]}"; do args+=(--text "$t"); done

# The first answers may be rejections while the worker is still loading the model; retry briefly.
deadline=$((SECONDS + 120))
while :; do
  start=$(date +%s%N)
  if answer=$("$bin/fleet" infer --nats-url "$url" --nats-nkey-file "$work/demo.nk" --key "$work/demo-key.toml" --timeout 10s "${args[@]}" 2>"$work/infer.log"); then
    end=$(date +%s%N)
    break
  fi
  [ $SECONDS -lt $deadline ] || fail "no embedding within 120 s: $(cat "$work/infer.log")"
  sleep 1
done

ANSWER="$answer" ELAPSED_MS=$(((end - start) / 1000000)) python3 "$root/ops/print-answer.py" "${texts[@]}"

[ -n "$observe" ] || exit 0
job_id=$(ANSWER="$answer" python3 -c 'import json, os; print(json.loads(os.environ["ANSWER"])["job_id"])')
# The job's admission (the dispatcher's audit event), found by its id, and the processes' lines
# (a job's own lines are at debug level: RUST_LOG=debug ships them too).
ES_URL="$es_url" JOB_ID="$job_id" python3 - <<'PY' || fail "the job's story did not reach Elasticsearch"
import json, os, time, urllib.request
es, job = os.environ["ES_URL"], os.environ["JOB_ID"]
def count(indices, query):
    request = urllib.request.Request(f"{es}/{indices}/_count", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    return json.load(urllib.request.urlopen(request, timeout=2))["count"]
deadline = time.time() + 30
audit = lines = None
while True:
    try:
        audit = count("fleet-audit-*", {"bool": {"filter": [{"term": {"job_id": job}}, {"term": {"action": "admission"}}]}})
        lines = count("fleet-logs-*", {"match_all": {}})
        if audit >= 1 and lines >= 1:
            break
    except OSError:
        pass
    if time.time() > deadline:
        raise SystemExit(f"within 30 s: {audit} admission events of the job, {lines} log lines")
    time.sleep(0.5)
PY
# Where each process serves HTTP: the line it logs when it binds (port 0 picked a free one).
http_of() { sed -n 's/.*"local_addr":"\([0-9.:]*\)".*/\1/p' "$work/$1.log" | head -n 1; }
dispatcher_http=$(http_of dispatcher)
worker_http=$(http_of worker)
[ -n "$dispatcher_http" ] && [ -n "$worker_http" ] || fail "no HTTP address in the processes' logs"
prometheus_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/prometheus.yml" <<EOF
global: { scrape_interval: 2s, evaluation_interval: 2s }
rule_files: ["$root/ops/observability/fleet-alerts.yml"]
scrape_configs:
  - job_name: fleet-dispatcher
    static_configs: [{ targets: ["$dispatcher_http"] }]
  - job_name: fleet-worker
    static_configs: [{ targets: ["$worker_http"] }]
EOF
spawn prometheus prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address="127.0.0.1:$prometheus_port"
prometheus_url="http://127.0.0.1:$prometheus_port"
# Both targets scraped and up, as Prometheus itself reports them.
PROMETHEUS_URL="$prometheus_url" python3 - <<'PY' || fail "Prometheus does not see the fleet"
import json, os, time, urllib.request
url = os.environ["PROMETHEUS_URL"] + "/api/v1/query?query=up"
deadline = time.time() + 60
while True:
    try:
        result = json.load(urllib.request.urlopen(url, timeout=2))["data"]["result"]
        up = {r["metric"]["job"] for r in result if r["value"][1] == "1"}
        if {"fleet-dispatcher", "fleet-worker"} <= up:
            break
    except OSError:
        pass
    if time.time() > deadline:
        raise SystemExit("targets not up within 60 s")
    time.sleep(0.5)
PY
cat <<EOF

Observing (Ctrl-C stops everything):
  Prometheus       $prometheus_url  (alerts: $prometheus_url/alerts; try fleet_worker_jobs_total)
  dispatcher HTTP  http://$dispatcher_http/metrics /health /ready /info
  worker HTTP      http://$worker_http/metrics /health /ready /info
  Grafana          import $root/ops/observability/grafana/fleet-dashboard.json, data source $prometheus_url
  Elasticsearch    $es_url  (logs: fleet-logs-*, audit: fleet-audit-*)
  one job's story  curl -s '$es_url/fleet-*/_search?q=job_id:$job_id&sort=@timestamp:asc'
  logs             $work/*.log
  call it again    $bin/fleet infer --nats-url $url --nats-nkey-file $work/demo.nk --key $work/demo-key.toml --text hello
                   (with NATS_TLS_CA, NATS_TLS_CERT, NATS_TLS_KEY under $work/pki as this script sets them)
EOF
if [ "$observe" = forever ]; then
  while :; do sleep 3600; done
else
  sleep "$observe"
fi
