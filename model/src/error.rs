use std::path::PathBuf;

/// Everything that can go wrong loading or running the model.
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
