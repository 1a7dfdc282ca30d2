//! The real model (fleet-model on candle) behind the [`Embedder`] trait: loaded once, then
//! owned by the runtime thread, which holds the device.

use std::path::Path;

use candle_core::Device;
use fleet_model::{
    EmbeddingModel, ModelError, ModelRuntime, OwnedSequence, Precision, RuntimeHandle,
};
use futures::future::BoxFuture;

use crate::{
    DeviceSpec,
    embedder::{EmbedError, Embedder, TokenizeError, TokenizedInput},
};

/// Batches that may wait for the runtime thread while it runs one: the batcher runs one batch
/// at a time, so a short queue is enough.
const RUNTIME_QUEUE_DEPTH: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error("cannot open device {device}: {source}")]
    Device {
        device: DeviceSpec,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Handle to the model's runtime thread.
#[derive(Clone)]
pub struct ModelEmbedder(RuntimeHandle);

/// Loads the model from `dir` onto `device` and starts its runtime thread, with the linear
/// layers in `precision` (`--precision`); a mode this machine cannot run is refused here, before
/// the worker takes any job.
pub fn load(
    dir: &Path,
    device: DeviceSpec,
    precision: Precision,
) -> Result<ModelEmbedder, ModelLoadError> {
    let candle_device = match device {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        // Fails with candle's "not compiled with cuda" error on a build without CUDA.
        DeviceSpec::Cuda(ordinal) => Device::new_cuda(ordinal),
    }
    .map_err(|source| ModelLoadError::Device { device, source })?;
    let model = EmbeddingModel::load_with_precision(dir, &candle_device, precision)?;
    tracing::info!(asked = %precision, running = %model.precision(), "model precision");
    Ok(ModelEmbedder(ModelRuntime::spawn(
        model,
        RUNTIME_QUEUE_DEPTH,
    )))
}

impl ModelEmbedder {
    /// The precision the linear layers run in (`Auto` resolved).
    pub fn precision(&self) -> Precision {
        self.0.precision()
    }
}

impl Embedder for ModelEmbedder {
    fn max_tokens(&self) -> usize {
        self.0.max_tokens()
    }

    fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, TokenizeError> {
        self.0
            .tokenize(text, truncate)
            .map_err(|error| match error {
                ModelError::TooLong { tokens, max } => TokenizeError::TooLong { tokens, max },
                other => TokenizeError::Failed(Box::new(other)),
            })
    }

    fn embed(
        &self,
        batch: Vec<TokenizedInput>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, EmbedError>> {
        let batch = batch
            .into_iter()
            .map(|input| OwnedSequence {
                token_ids: input.token_ids,
                normalize: input.normalize,
            })
            .collect();
        let running = self.0.embed(batch);
        Box::pin(async move {
            running.await.map_err(|error| EmbedError {
                kind: error.kind(),
                source: Box::new(error),
            })
        })
    }
}

/// Only a CPU-only build has something to check here without a GPU.
#[cfg(all(test, not(feature = "cuda")))]
mod tests {
    use super::*;

    /// A CPU-only build asked for a GPU stops at the device, before touching the model files.
    #[test]
    fn cuda_device_without_the_feature_is_a_typed_error() {
        let missing = Path::new("/nonexistent/model");
        match load(missing, DeviceSpec::Cuda(0), Precision::Auto) {
            Err(ModelLoadError::Device { device, source }) => {
                assert_eq!(device, DeviceSpec::Cuda(0));
                assert!(source.to_string().contains("cuda"), "{source}");
            }
            Err(other) => panic!("expected a device error, got {other}"),
            Ok(_) => panic!("a CPU-only build opened a CUDA device"),
        }
    }
}
