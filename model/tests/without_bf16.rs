//! What a CPU without AVX512-BF16 does, on any CPU: the kernels are capped below AVX-512 for
//! this whole test binary (its own process, so no other test sees the cap). Needs the real
//! model (`ops/fetch-model.sh`, or `FLEET_MODEL_DIR`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use fleet_kernels::cpu::{SimdLevel, bf16_supported, set_max_simd_level};
use fleet_model::{EmbeddingModel, ModelError, Precision, Sequence};

fn model_dir() -> PathBuf {
    std::env::var_os("FLEET_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2"))
}

#[test]
fn auto_runs_f32_and_the_bf16_modes_are_refused_by_name() {
    set_max_simd_level(SimdLevel::Avx2);
    assert!(!bf16_supported());
    let dir = model_dir();
    let model = EmbeddingModel::load_with_precision(&dir, &Device::Cpu, Precision::Auto)
        .expect("auto loads anywhere");
    assert_eq!(model.precision(), Precision::F32);
    let ids = model.tokenize("a short text", true).expect("tokenize");
    let out = model.embed(&[Sequence::normalized(&ids)]).expect("embed");
    assert_eq!(out[0].len(), 384);

    for precision in [Precision::Bf16, Precision::Bf16x3] {
        match EmbeddingModel::load_with_precision(&dir, &Device::Cpu, precision) {
            Err(ModelError::Precision(e)) => {
                assert_eq!(e.precision, precision);
                assert!(e.to_string().contains("AVX512-BF16"), "{e}");
            }
            Err(other) => panic!("{precision}: expected a precision error, got {other}"),
            Ok(_) => panic!("{precision} loaded on a CPU without AVX512-BF16"),
        }
    }
}
