#!/usr/bin/env bash
# Builds fleet-kernels with the `cuda` feature: the CUDA kernels (nvcc), their bindgen bindings,
# candle's CUDA backend, the test and bench binaries, the `worker` binary that runs the model
# on a GPU (`--device cuda:N`) and the model's throughput example (compile and link only: nothing here needs a GPU). Installs the toolchain first if missing (ops/install-cuda-toolchain.sh).
#
# Output goes to target/cuda (CARGO_TARGET_DIR) so that it never invalidates the main build.
# Extra arguments go to cargo, e.g. `ops/build-cuda.sh --release`.
#
# Environment (all optional):
#   FLEET_CUDA_COMPUTE_CAPS  our kernels' targets, SASS + PTX each (default 80,90)
#   CUDA_COMPUTE_CAP         candle-kernels' single target; its PTX is JIT-compiled by newer GPUs
#                            (default 80)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

"$repo/ops/install-cuda-toolchain.sh" >/dev/null
eval "$("$repo/ops/install-cuda-toolchain.sh" --env)"

export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export FLEET_CUDA_COMPUTE_CAPS="${FLEET_CUDA_COMPUTE_CAPS:-80,90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"

# One cargo invocation for everything: features are resolved per invocation, and a second one
# with another package set could resolve candle's differently and compile its CUDA kernels again.
build=(cargo build -p fleet-kernels -p fleet-model -p fleet-worker --features fleet-worker/cuda --all-targets)
start=$(date +%s)
"${build[@]}" "$@"
echo "cuda build finished in $(( $(date +%s) - start ))s (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)" >&2

# The GPU test and bench executables, copied to one folder that ops/gpu-check.sh runs on a GPU
# machine (no cargo or registry needed there). The same command again is a no-op build that
# reports the executables' paths.
bundle="$CARGO_TARGET_DIR/gpu-bundle"
rm -rf "$bundle"
mkdir -p "$bundle"
"${build[@]}" --message-format=json "$@" |
  python3 -c '
import json, shutil, sys
wanted = {("test", "cuda_ops"), ("bench", "cuda_fused"), ("bin", "worker"), ("example", "throughput")}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    kinds = t.get("kind") or []
    # --all-targets also builds each binary as a unit-test harness: skip that one.
    if kinds in (["bin"], ["example"]) and (m.get("profile") or {}).get("test"):
        continue
    for kind in kinds:
        if (kind, t.get("name")) in wanted and m.get("executable"):
            shutil.copy2(m["executable"], sys.argv[1] + "/" + t["name"])
            print("bundled", m["executable"], file=sys.stderr)
' "$bundle"
for exe in cuda_ops cuda_fused worker throughput; do
  if [[ ! -x "$bundle/$exe" ]]; then
    echo "error: $exe was not built" >&2
    exit 1
  fi
done
cp "$repo/ops/gpu-check.sh" "$repo/fixtures/minilm_reference.json" "$repo/fixtures/corpus.jsonl" "$bundle/"
echo "GPU bundle: $bundle (copy it and the model to a GPU machine; see ops/gpu-check.sh)" >&2
