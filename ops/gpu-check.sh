#!/usr/bin/env bash
# Runs the CUDA kernel tests and benches on a machine with an NVIDIA GPU, from prebuilt binaries.
#
# Build them (any Linux x86_64 machine, no GPU needed):
#   ops/build-cuda.sh
# which runs `cargo build -p fleet-kernels --features cuda --all-targets` with
# CARGO_TARGET_DIR=target/cuda (equivalently `cargo test --no-run` / `cargo bench --no-run` with
# `--features cuda`; the executables land in target/cuda/debug/deps/cuda_ops-<hash> (tests) and
# cuda_fused-<hash> (bench)) and copies them to target/cuda/gpu-bundle/ with this script.
#
# On the GPU machine: the NVIDIA driver (libcuda.so.1), and the CUDA 13 libraries candle links
# (libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13) on the loader path: a
# CUDA 13 install, or the wheels under .cuda-toolchain/link/nvidia/cu13/lib (set
# FLEET_CUDA_LIBS to that folder). Never put .cuda-toolchain/stubs on the loader path there: it
# is a link-time stand-in for the driver that reports "no device".
#
#   gpu-check.sh [BUNDLE_DIR]      # default: the folder of this script if it holds the
#                                  # binaries, else <repo>/target/cuda/gpu-bundle
#
# The whole-model test and the throughput runs need FLEET_MODEL_DIR (all-MiniLM-L6-v2, ops/fetch-model.sh)
# where the build-time path does not exist. The reference embeddings and the corpus travel in the
# bundle (FLEET_MINILM_REFERENCE and FLEET_BENCH_CORPUS override them). A test that prints "SKIPPED: no CUDA device" did not run: this script fails then.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -ge 1 ]]; then
  bundle="$1"
elif [[ -x "$here/cuda_ops" ]]; then
  bundle="$here"
else
  bundle="$here/../target/cuda/gpu-bundle"
fi
# The bundle's copies of fixtures/, unless the caller named others.
if [[ -f "$bundle/minilm_reference.json" ]]; then
  export FLEET_MINILM_REFERENCE="${FLEET_MINILM_REFERENCE:-$bundle/minilm_reference.json}"
fi
if [[ -f "$bundle/corpus.jsonl" ]]; then
  export FLEET_BENCH_CORPUS="${FLEET_BENCH_CORPUS:-$bundle/corpus.jsonl}"
fi
if [[ -n "${FLEET_CUDA_LIBS:-}" ]]; then
  export LD_LIBRARY_PATH="$FLEET_CUDA_LIBS:${LD_LIBRARY_PATH:-}"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
else
  echo "warning: no nvidia-smi on PATH" >&2
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# One test thread: the tests share the one device, and their output stays readable.
# --nocapture: the skip notices go to stderr, which libtest hides for passing tests.
"$bundle/cuda_ops" --test-threads=1 --nocapture 2>&1 | tee "$log"
if grep -q "SKIPPED: no CUDA device" "$log"; then
  echo "error: the CUDA tests were skipped (no usable CUDA device): nothing was checked" >&2
  exit 1
fi
"$bundle/cuda_fused" --bench 2>&1 | tee "$log"
if grep -q "SKIPPED: no CUDA device" "$log"; then
  echo "error: the benches were skipped (no usable CUDA device)" >&2
  exit 1
fi
# Embedding throughput on the corpus: the GPU at batch 32, 128 and 512 against the roofline,
# then the same model on this machine's CPU.
"$bundle/throughput" --device cuda:0 --batch 32 --batch 128 --batch 512 --runs 3 --roofline
"$bundle/throughput" --device cpu --batch 32 --runs 3
