use std::path::PathBuf;

/// Everything that can go wrong loading or running the model.
///
/// [`ModelError::kind`] says whether the same call would fail again, so that a caller can
/// decide between retrying a batch and giving up on it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("unsupported pooling in {path}: {message} (only mean pooling is implemented)")]
    UnsupportedPooling { path: PathBuf, message: String },
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    #[error("weights lack tensor `{name}`")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {actual:?}, the config implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(transparent)]
    Precision(#[from] crate::PrecisionUnavailable),
    #[error("input is {tokens} tokens, the model takes at most {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    InvalidTokenId { id: u32, vocab_size: usize },
    #[error("kernel refused its input: {0}")]
    Kernel(#[from] fleet_kernels::cpu::ShapeError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("the model runtime thread is not running: {0}")]
    RuntimeStopped(String),
    #[error("the model panicked on this batch: {0}")]
    Panicked(String),
}

/// Whether a failed call would fail again if repeated unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The input (or, at load, the model's files) caused it: the same batch fails the same way
    /// on any worker, so retrying it only delays the answer.
    Deterministic,
    /// The moment caused it (the runtime thread stopped, the device failed or ran out of
    /// memory, a file could not be read): the same batch may succeed later or elsewhere.
    Transient,
}

impl ModelError {
    /// Whether repeating the call unchanged would fail again.
    ///
    /// * [`Deterministic`](FailureKind::Deterministic): `TooLong`, `InvalidTokenId`,
    ///   `Tokenize`, `Kernel` (a shape refused), `Panicked` (a kernel or candle panicked on this
    ///   batch's shapes; the runtime serves the next batch normally), the load errors about the
    ///   files' content (`Config`, `Unsupported`, `UnsupportedPooling`, `TokenizerLoad`,
    ///   `Precision` (a mode this machine cannot run),
    ///   `MissingTensor`, `TensorShape`), and `Tensor` errors other than the ones below (shape,
    ///   dtype, index errors).
    /// * [`Transient`](FailureKind::Transient): `RuntimeStopped` (the thread is gone or its
    ///   queue closed: nothing about the batch), `Io`, and `Tensor` errors that come from the
    ///   device or the OS (candle's `Cuda` and `Metal`, which carry out-of-memory and launch
    ///   failures, and `Io`), also when candle wrapped them in context.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Io { .. } | Self::RuntimeStopped(_) => FailureKind::Transient,
            Self::Tensor(e) => candle_kind(e),
            Self::Config { .. }
            | Self::Unsupported(_)
            | Self::Precision(_)
            | Self::UnsupportedPooling { .. }
            | Self::TokenizerLoad { .. }
            | Self::Tokenize(_)
            | Self::MissingTensor { .. }
            | Self::TensorShape { .. }
            | Self::TooLong { .. }
            | Self::InvalidTokenId { .. }
            | Self::Kernel(_)
            | Self::Panicked(_) => FailureKind::Deterministic,
        }
    }
}

fn candle_kind(e: &candle_core::Error) -> FailureKind {
    use candle_core::Error as E;
    match e {
        E::Context { inner, .. } | E::WithPath { inner, .. } | E::WithBacktrace { inner, .. } => {
            candle_kind(inner)
        }
        E::Cuda(_) | E::Metal(_) | E::Io(_) => FailureKind::Transient,
        _ => FailureKind::Deterministic,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn io() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out")
    }

    #[test]
    fn input_and_content_errors_are_deterministic() {
        let path = PathBuf::from("model/config.json");
        for e in [
            ModelError::TooLong { tokens: 9, max: 8 },
            ModelError::InvalidTokenId {
                id: 99,
                vocab_size: 12,
            },
            ModelError::Tokenize("bad text".into()),
            ModelError::Kernel(fleet_kernels::cpu::ShapeError("rows".into())),
            ModelError::Panicked("index out of bounds".into()),
            ModelError::Config {
                path: path.clone(),
                message: "not JSON".into(),
            },
            ModelError::Unsupported("relu".into()),
            // The same machine refuses the same mode on every try.
            ModelError::Precision(crate::PrecisionUnavailable {
                precision: crate::Precision::Bf16,
                reason: "this CPU lacks AVX512-BF16".into(),
            }),
            ModelError::UnsupportedPooling {
                path: path.clone(),
                message: "cls".into(),
            },
            ModelError::TokenizerLoad {
                path,
                message: "{}".into(),
            },
            ModelError::MissingTensor { name: "x".into() },
            ModelError::TensorShape {
                name: "x".into(),
                expected: vec![2],
                actual: vec![3],
            },
        ] {
            assert_eq!(e.kind(), FailureKind::Deterministic, "{e}");
        }
    }

    #[test]
    fn a_stopped_runtime_and_unreadable_files_are_transient() {
        for e in [
            ModelError::RuntimeStopped("the model thread has exited".into()),
            ModelError::Io {
                path: "model.safetensors".into(),
                source: io(),
            },
        ] {
            assert_eq!(e.kind(), FailureKind::Transient, "{e}");
        }
    }

    #[test]
    fn candle_shape_errors_are_deterministic_and_device_errors_transient() {
        let a = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).expect("zeros");
        let shape = a.matmul(&a).expect_err("[2, 3] x [2, 3] does not multiply");
        assert_eq!(ModelError::from(shape).kind(), FailureKind::Deterministic);
        // What the kernels' candle ops return for a refused shape.
        let refused = candle_core::Error::from(fleet_kernels::cpu::ShapeError("rows".into()));
        assert_eq!(ModelError::from(refused).kind(), FailureKind::Deterministic);

        // A device failure such as CUDA's out of memory arrives boxed in `Cuda`.
        let device = || candle_core::Error::Cuda(Box::new(io()));
        assert_eq!(ModelError::from(device()).kind(), FailureKind::Transient);
        assert_eq!(
            ModelError::from(candle_core::Error::Io(io())).kind(),
            FailureKind::Transient
        );
        // Context added on the way up does not hide the cause.
        let wrapped = device().context("layer 3").with_path("model.safetensors");
        assert_eq!(ModelError::from(wrapped).kind(), FailureKind::Transient);
        let wrapped_shape = candle_core::Error::Msg("rank".into()).context("layer 3");
        assert_eq!(
            ModelError::from(wrapped_shape).kind(),
            FailureKind::Deterministic
        );
    }
}
