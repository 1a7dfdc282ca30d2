//! The real model behind the [`Embedder`](crate::Embedder) trait.

use std::path::Path;

use crate::{DeviceSpec, FakeEmbedder};

#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    /// fleet-model (candle) is not wired in yet; the worker binary cannot serve until it is.
    #[error(
        "this build has no model runtime: fleet-model is not wired into the worker yet (model dir {dir}, device {device})"
    )]
    NoRuntime { dir: String, device: DeviceSpec },
}

pub fn load(dir: &Path, device: DeviceSpec) -> Result<FakeEmbedder, ModelLoadError> {
    Err(ModelLoadError::NoRuntime {
        dir: dir.display().to_string(),
        device,
    })
}
