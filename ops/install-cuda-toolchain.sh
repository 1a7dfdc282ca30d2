#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain (nvcc, NVVM, CRT headers, CCCL, cudart) from PyPI wheels
# into a git-ignored folder of the repository, plus Debian's libclang for bindgen. Build only:
# no driver and no GPU are needed or installed.
#
#   ops/install-cuda-toolchain.sh            # install (quick no-op when already installed)
#   eval "$(ops/install-cuda-toolchain.sh --env)"   # print / apply the environment only
#
# The folder is $FLEET_CUDA_TOOLCHAIN (default <repo>/.cuda-toolchain).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${FLEET_CUDA_TOOLCHAIN:-$repo/.cuda-toolchain}"
cu="$dir/nvidia/cu13"

# Pinned together: nvcc, NVVM and the CRT headers must be the same release, and CCCL (CUB,
# Thrust, libcu++) must match the major.minor of nvcc.
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
)
stamp="$dir/.installed"

# Link-time libraries: candle-core's `cuda` feature makes cudarc link (not load) libcublas,
# libcublasLt, libcurand and libnvrtc, so every test and bench binary needs them to link. Kept in
# their own folder so adding them never touches a toolkit a build may be using.
link_pins=(
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.5.25
  nvidia-cuda-nvrtc==13.0.88
)
link_dir="$dir/link"
link_lib="$link_dir/nvidia/cu13/lib"
link_stamp="$link_dir/.installed"
# The driver library (libcuda) comes with the NVIDIA driver, not with any wheel: a stub with the
# driver API's symbols stands in at link time. Every stub function returns
# CUDA_ERROR_NO_DEVICE (100), so a binary that loads the stub (only ever through LIBRARY_PATH or
# an explicit LD_LIBRARY_PATH on a machine without a GPU) sees "no device" and skips.
stub_dir="$dir/stubs"

print_env() {
  # LIBCLANG_PATH: bindgen loads libclang at run time; Debian's libclang-dev puts it under
  # /usr/lib/llvm-<N>/lib.
  local libclang
  libclang="$(ls -d /usr/lib/llvm-*/lib 2>/dev/null | sort -V | tail -n 1 || true)"
  echo "export FLEET_CUDA_HOME='$cu'"
  echo "export CUDA_HOME='$cu'"
  echo "export CUDA_PATH='$cu'"
  echo "export CUDA_ROOT='$cu'"
  echo "export PATH='$cu/bin':\"\$PATH\""
  echo "export NVCC_PREPEND_FLAGS='-I$cu/include'"
  echo "export LIBRARY_PATH='$cu/lib:$link_lib:$stub_dir':\"\${LIBRARY_PATH:-}\""
  # Not the stubs: on a GPU machine the real libcuda.so.1 of the driver must be the one loaded.
  echo "export LD_LIBRARY_PATH='$cu/lib:$link_lib':\"\${LD_LIBRARY_PATH:-}\""
  echo "export FLEET_CUDA_STUBS='$stub_dir'"
  if [[ -n "$libclang" ]]; then
    echo "export LIBCLANG_PATH='$libclang'"
  fi
}

if [[ "${1:-}" == "--env" ]]; then
  print_env
  exit 0
fi

# From Debian's packages: pip for the wheels below (CI runs this before the test script's own
# installs), libclang for bindgen.
missing=()
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing+=(libclang-dev)
# nvcc drives the host C++ compiler; the driver stub below is built with gcc.
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "installing ${missing[*]}" >&2
  sudo_cmd=()
  if [[ "$(id -u)" != 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" && -x "$cu/bin/nvcc" ]]; then
  echo "CUDA toolchain already installed at $dir" >&2
else
  echo "installing ${pins[*]} into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target "$dir" "${pins[@]}"
  echo "${pins[*]}" >"$stamp"
fi

# The runtime wheel ships only the versioned libcudart.so.13; a link with -lcudart needs the
# unversioned name.
if [[ -f "$link_stamp" && "$(cat "$link_stamp")" == "${link_pins[*]}" ]]; then
  :
else
  echo "installing ${link_pins[*]} into $link_dir" >&2
  rm -rf "$link_dir"
  mkdir -p "$link_dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --target "$link_dir" \
    "${link_pins[@]}"
  echo "${link_pins[*]}" >"$link_stamp"
fi
# The wheels ship only versioned names (libcublas.so.13); `-lcublas` needs the plain one.
for lib in cublas cublasLt curand nvrtc; do
  if [[ ! -e "$link_lib/lib$lib.so" ]]; then
    versioned="$(cd "$link_lib" && ls "lib$lib.so."* | sort -V | head -n 1)"
    ln -s "$versioned" "$link_lib/lib$lib.so"
  fi
done

if [[ ! -f "$stub_dir/libcuda.so" || "$cu/include/cuda.h" -nt "$stub_dir/libcuda.so" ]]; then
  echo "generating the link stub $stub_dir/libcuda.so" >&2
  mkdir -p "$stub_dir"
  # The driver API's function names, from the preprocessed cuda.h (its macros map names like
  # cuMemAlloc to the versioned symbols, cuMemAlloc_v2, that the library exports).
  gcc -E -P -I"$cu/include" "$cu/include/cuda.h" |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u |
    sed 's/.*/int &(void) { return 100; }/' >"$stub_dir/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub_dir/libcuda.so" "$stub_dir/cuda_stub.c"
  ln -sf libcuda.so "$stub_dir/libcuda.so.1"
fi

if [[ ! -e "$cu/lib/libcudart.so" ]]; then
  soname="$(cd "$cu/lib" && ls libcudart.so.* 2>/dev/null | sort -V | head -n 1 || true)"
  if [[ -z "$soname" ]]; then
    echo "error: no libcudart.so.* under $cu/lib" >&2
    exit 1
  fi
  ln -s "$soname" "$cu/lib/libcudart.so"
fi

"$cu/bin/nvcc" --version | tail -n 2 >&2
echo "# environment for the cuda build (eval \"\$($0 --env)\"):" >&2
print_env
