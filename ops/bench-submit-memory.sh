#!/usr/bin/env bash
# Peak memory of `fleet submit` over large inputs (issue 11: a 1,000,000-row input must not be
# held in memory), against a real fleet (release build, loopback, one dispatcher, one worker).
# The worker embeds ~150 texts/s on this machine, so a whole 1M-row run would take about two
# hours; what grows with the row count is reading the input, reading the output on a resume and
# writing the errors file, so those are what is measured at full size:
#  resume-jsonl    a 1M-row input and its output with all but the last two jobs done (384-dim
#                  vectors, about 4 GB, a torn last line): the output scanned and cut, the
#                  input skipped, two jobs embedded, the errors file written from the whole output
#  resume-parquet  the same in Parquet: a 1M-row input and an output of 244 committed parts of
#                  4,096 rows: the parts' footers read, the input entered at its offset, the last
#                  576 rows embedded, the parts merged into one 1M-row file, the errors pass
#  live-*          runs from scratch for a while (default 45 s) on 100k- and 1M-row inputs,
#                  killed: peak RSS (VmHWM from /proc) while reading, sending and writing
# resume-* peak RSS from /usr/bin/time -v. Prints one JSON line per measurement.
# Needs pyarrow to write the Parquet files (installed into a temporary venv).
# Usage: ops/bench-submit-memory.sh [rows] [live seconds]
# BENCH_BUILD=0: use the binaries already built; BENCH_BIN: their folder (default target/release).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rows=${1:-1000000}
live_seconds=${2:-45}
texts_per_job=32
corpus="$root/fixtures/corpus.jsonl"
if [ "${BENCH_BUILD:-1}" != 0 ]; then
  "$root/ops/install-deps.sh"
  cargo build --quiet --release -p fleet-dispatcher -p fleet-worker -p fleet-client --bins
fi
bin=${BENCH_BIN:-"${CARGO_TARGET_DIR:-$root/target}/release"}
model="$root/models/all-MiniLM-L6-v2"
# shellcheck source=ops/lib.sh
source "$root/ops/lib.sh"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet pyarrow
start_nats
bench_tenant
RUST_LOG=warn spawn dispatcher "$bin/dispatcher" --nats-url "$url" --tenants "$work/tenants.toml" --metrics-addr 127.0.0.1:0
RUST_LOG=warn spawn worker "$bin/worker" --nats-url "$url" --tenants "$work/tenants.toml" --model-dir "$model" --metrics-addr 127.0.0.1:0

# Inputs of `rows` and of rows/10 rows (the corpus's texts over and over), as JSON lines and
# Parquet, each with row ids of its own (so no run reads another's stored results); outputs of
# the big ones with all but their last jobs done.
"$work/venv/bin/python" - "$corpus" "$work" "$rows" "$texts_per_job" <<'PY'
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
corpus, work, rows, per_job = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
texts = [json.loads(line)["text"] for line in open(corpus) if line.strip()]
def jsonl(name, n, prefix):
    with open(f"{work}/{name}.jsonl", "w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"{prefix}-{i}", "text": texts[i % len(texts)]}) + "\n")
def parquet(name, n, prefix):
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(f"{work}/{name}.parquet", schema, compression="snappy") as writer:
        for start in range(0, n, 100_000):
            index = range(start, min(n, start + 100_000))
            writer.write_table(pa.table({"id": [f"{prefix}-{i}" for i in index],
                "text": [texts[i % len(texts)] for i in index]}, schema=schema))
jsonl("big", rows, "j")
parquet("big", rows, "p")
jsonl("small", rows // 10, "sj")
parquet("small", rows // 10, "sp")
# 384 numbers as serde_json prints f32s.
vector = [((i * 7919) % 1000 - 500) / 12345.678 for i in range(384)]
vector_json = json.dumps([float(f"{x:.8g}") for x in vector], separators=(",", ":"))
with open(f"{work}/big.out.jsonl", "w") as out:
    for i in range(rows - 2 * per_job):
        out.write(f'{{"id":"j-{i}","status":"ok","vector":{vector_json}}}\n')
    out.write('{"id":"j-torn","status":"o')
item = pa.field("item", pa.float32(), nullable=False)
schema = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("vector", pa.list_(item)),
                    pa.field("status", pa.string(), nullable=False), pa.field("code", pa.string()),
                    pa.field("message", pa.string())])
part_rows = 4096
parts = f"{work}/big.out.parquet.parts"
os.makedirs(parts)
values = pa.array(vector * part_rows, pa.float32())
offsets = pa.array(range(0, 384 * part_rows + 1, 384), pa.int32())
vectors = pa.ListArray.from_arrays(offsets, values, type=pa.list_(item))
for part in range((rows - 2 * per_job) // part_rows):
    ids = pa.array([f"p-{part * part_rows + i}" for i in range(part_rows)])
    table = pa.Table.from_arrays([ids, vectors, pa.array(["ok"] * part_rows),
        pa.nulls(part_rows, pa.string()), pa.nulls(part_rows, pa.string())], schema=schema)
    # List items named `item`, as arrow-rs names them (fleet submit checks its parts' columns).
    pq.write_table(table, f"{parts}/part-{part:06}.parquet", compression="snappy",
                   use_compliant_nested_type=False)
PY
du -sh "$work"/big* "$work"/small* >&2

submit=("$bin/fleet" submit --nats-url "$url" --key "$work/key.toml" --texts-per-job "$texts_per_job"
  --in-flight 64 --progress never)
# The fleet answers before anything is measured.
echo '{"id": "warm", "text": "warm up"}' >"$work/warm.jsonl"
for _ in $(seq 120); do
  "${submit[@]}" --input "$work/warm.jsonl" --output "$work/warm.out.jsonl" --job-timeout 5s \
    --max-attempts 1 >/dev/null 2>&1 && break
  rm -f "$work/warm.out.jsonl"
  sleep 1
done

resume() { # name input output
  local started ended
  started=$(date +%s.%N)
  /usr/bin/time -v -o "$work/$1.time" "${submit[@]}" --input "$2" --output "$3" 2>"$work/$1.log" ||
    { tail -n 20 "$work/$1.log" >&2; exit 1; }
  ended=$(date +%s.%N)
  python3 - "$1" "$started" "$ended" "$work/$1.time" "$work/$1.log" <<'PY'
import json, re, sys
name, started, ended = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
timing, log = open(sys.argv[4]).read(), open(sys.argv[5]).read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing).group(1))
summary = next(json.loads(line) for line in log.splitlines() if line.startswith("{"))
print(json.dumps({"bench": name, "seconds": round(ended - started, 1),
                  "peak_rss_mib": round(rss / 1024, 1), **summary}))
PY
}
resume resume-jsonl "$work/big.jsonl" "$work/big.out.jsonl"
resume resume-parquet "$work/big.parquet" "$work/big.out.parquet"
rm -f "$work/big.out.jsonl" "$work/big.out.parquet"

live() { # name input output
  "${submit[@]}" --input "$2" --output "$3" 2>"$work/$1.log" &
  local pid=$! peak=0 now written
  for _ in $(seq "$live_seconds"); do
    sleep 1
    now=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$now" ] && peak=$now
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  case $3 in
    *.parquet) written=$("$work/venv/bin/python" -c "import glob, sys, pyarrow.parquet as pq; print(sum(pq.ParquetFile(p).metadata.num_rows for p in glob.glob(sys.argv[1] + '.parts/*.parquet')))" "$3") ;;
    *) written=$(wc -l <"$3") ;;
  esac
  python3 -c "import json, sys; print(json.dumps({'bench': sys.argv[1], 'input_rows': int(sys.argv[2]), 'seconds': int(sys.argv[3]), 'rows_written': int(sys.argv[4]), 'peak_rss_mib': round(int(sys.argv[5]) / 1024, 1)}))" \
    "$1" "$(wc -l <"${2%.*}.jsonl")" "$live_seconds" "$written" "$peak"
}
live live-jsonl-small "$work/small.jsonl" "$work/small.out.jsonl"
live live-parquet-small "$work/small.parquet" "$work/small.out.parquet"
live live-jsonl-big "$work/big.jsonl" "$work/live-big.out.jsonl"
live live-parquet-big "$work/big.parquet" "$work/live-big.out.parquet"
