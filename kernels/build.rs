//! With the `cuda` feature: compiles `cuda/*.cu` with nvcc into a static library, links it and
//! the CUDA runtime, and generates Rust bindings for `cuda/fleet_kernels.h` into `OUT_DIR`.
//! Without the feature it does nothing, so the crate builds with no CUDA toolchain at all.
//!
//! Environment:
//! * `NVCC` (default `nvcc` on `PATH`), `CUDA_HOME` / `CUDA_PATH` / `CUDA_ROOT` (the toolkit
//!   root; default: the parent of nvcc's `bin/`), for `lib/` with the runtime;
//! * `FLEET_CUDA_COMPUTE_CAPS`, else `CUDA_COMPUTE_CAP`: compute capabilities to build for, e.g.
//!   `90` or `80,90` (default `80,90`): SASS for each, plus PTX so newer GPUs can JIT-compile.
//!   candle-kernels reads `CUDA_COMPUTE_CAP` too but takes exactly one value (and needs it where
//!   no GPU is visible), hence the list of our own;
//! * `NVCC_FLAGS`: extra flags, split on whitespace.

fn main() {
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const HEADER: &str = "cuda/fleet_kernels.h";

    pub fn build() {
        let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets it"));
        let cuda_dir = manifest.join("cuda");
        for var in [
            "NVCC",
            "NVCC_FLAGS",
            "FLEET_CUDA_COMPUTE_CAPS",
            "CUDA_COMPUTE_CAP",
            "CUDA_HOME",
            "CUDA_PATH",
            "CUDA_ROOT",
        ] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-changed={}", cuda_dir.display());

        let mut sources: Vec<PathBuf> = std::fs::read_dir(&cuda_dir)
            .unwrap_or_else(|e| fail(&format!("reading {}: {e}", cuda_dir.display())))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("cu" | "cuh" | "h")
                )
            })
            .collect();
        sources.sort();
        for s in &sources {
            println!("cargo:rerun-if-changed={}", s.display());
        }

        let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
        let gencode = gencode_flags();
        let extra: Vec<String> = env::var("NVCC_FLAGS")
            .map(|f| f.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut objects = Vec::new();
        for src in sources
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        {
            let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
            let obj = out.join(format!("{stem}.o"));
            let status = Command::new(&nvcc)
                .args(["-c", "-O3", "-std=c++17"])
                .args(["-Xcompiler", "-fPIC"])
                .args(&gencode)
                .args(&extra)
                .arg("-I")
                .arg(&cuda_dir)
                .arg("-o")
                .arg(&obj)
                .arg(src)
                .status()
                .unwrap_or_else(|e| {
                    fail(&format!(
                        "running {nvcc}: {e} (install the toolchain with \
                         ops/install-cuda-toolchain.sh and put its bin/ on PATH)"
                    ))
                });
            if !status.success() {
                fail(&format!("{nvcc} failed on {} ({status})", src.display()));
            }
            objects.push(obj);
        }

        let lib = out.join("libfleet_cuda_kernels.a");
        // `ar` rebuilds the archive from scratch: stale members of a removed source must go.
        let _ = std::fs::remove_file(&lib);
        let status = Command::new(env::var("AR").unwrap_or_else(|_| "ar".to_string()))
            .arg("crs")
            .arg(&lib)
            .args(&objects)
            .status()
            .unwrap_or_else(|e| fail(&format!("running ar: {e}")));
        if !status.success() {
            fail(&format!("ar failed ({status})"));
        }
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=fleet_cuda_kernels");

        // The static runtime: the binaries then need only the driver (libcuda) on the GPU
        // machine, like candle's own kernels, which cudarc loads through the driver.
        let lib_dir = cuda_lib_dir(&nvcc);
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
        println!("cargo:rustc-link-lib=static=cudart_static");
        for sys in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib=dylib={sys}");
        }

        let bindings = bindgen::Builder::default()
            .header(manifest.join(HEADER).to_string_lossy())
            .allowlist_function("fleet_.*")
            .allowlist_type("Fleet.*")
            .allowlist_var("FLEET_.*")
            .derive_default(true)
            .derive_debug(true)
            .generate()
            .unwrap_or_else(|e| fail(&format!("bindgen on {HEADER}: {e}")));
        bindings
            .write_to_file(out.join("fleet_kernels_sys.rs"))
            .unwrap_or_else(|e| fail(&format!("writing the bindings: {e}")));
    }

    /// `-gencode` flags for the capabilities (comma- or space-separated, `80` or `8.0`).
    fn gencode_flags() -> Vec<String> {
        let caps = env::var("FLEET_CUDA_COMPUTE_CAPS")
            .or_else(|_| env::var("CUDA_COMPUTE_CAP"))
            .unwrap_or_else(|_| "80,90".to_string());
        let mut flags = Vec::new();
        for cap in caps.split([',', ' ']).filter(|c| !c.is_empty()) {
            let cap = cap.replace('.', "");
            if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_alphanumeric()) {
                fail(&format!("bad compute capability {cap:?}"));
            }
            flags.push("-gencode".to_string());
            flags.push(format!("arch=compute_{cap},code=[sm_{cap},compute_{cap}]"));
        }
        if flags.is_empty() {
            fail("the compute capabilities name none");
        }
        flags
    }

    /// The toolkit's `lib/` (or `lib64/`): from `CUDA_HOME`-style variables, else next to nvcc.
    fn cuda_lib_dir(nvcc: &str) -> PathBuf {
        let root = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
            .iter()
            .find_map(|v| env::var_os(v).map(PathBuf::from))
            .or_else(|| which(nvcc).and_then(|p| p.parent()?.parent().map(Path::to_path_buf)))
            .unwrap_or_else(|| fail("cannot find the CUDA toolkit: set CUDA_HOME"));
        ["lib64", "lib"]
            .iter()
            .map(|d| root.join(d))
            .find(|d| d.join("libcudart_static.a").is_file())
            .unwrap_or_else(|| {
                fail(&format!(
                    "no libcudart_static.a under {}/lib64 or /lib",
                    root.display()
                ))
            })
    }

    fn which(program: &str) -> Option<PathBuf> {
        let p = Path::new(program);
        if p.components().count() > 1 {
            return Some(p.to_path_buf());
        }
        env::split_paths(&env::var_os("PATH")?)
            .map(|d| d.join(program))
            .find(|c| c.is_file())
    }

    fn fail(msg: &str) -> ! {
        panic!("fleet-kernels (feature cuda): {msg}");
    }
}
