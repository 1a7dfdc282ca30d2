//! What the batcher needs from a model: tokenize once per input, embed a batch of token
//! sequences. The real model sits behind this trait, so the pipeline can be exercised (and
//! specified by tests) with a fast deterministic stand-in (in the worker's tests).

use futures::future::BoxFuture;

/// One input ready for the model: its tokens and whether its vector is L2-normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedInput {
    pub token_ids: Vec<u32>,
    pub normalize: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("input is {tokens} tokens, the model takes at most {max}")]
    TooLong { tokens: usize, max: usize },
    #[error("cannot tokenize input: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Whether a failed batch would fail again: a deterministic failure is caused by the batch's
/// inputs, so its jobs are re-run one at a time to find the poison one; a transient one by the
/// runtime's state, so its jobs are retried.
pub use fleet_model::FailureKind;

/// A failure of the model runtime on a batch.
#[derive(Debug, thiserror::Error)]
#[error("model runtime failed on a batch ({kind:?}): {source}")]
pub struct EmbedError {
    pub kind: FailureKind,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Cloned into the intake and the batcher, so implementations are cheap handles.
pub trait Embedder: Clone + Send + Sync + 'static {
    /// Longest sequence the model takes, in tokens.
    fn max_tokens(&self) -> usize;
    /// Tokens of `text`; `truncate` cuts an over-long input instead of failing with `TooLong`.
    fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, TokenizeError>;
    /// One vector per input, in batch order. Owned input, because the model runs on a thread
    /// of its own.
    fn embed(
        &self,
        batch: Vec<TokenizedInput>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, EmbedError>>;
}

/// Why a model failed its first forward pass.
#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    #[error("the model cannot tokenize its warm-up text: {0}")]
    Tokenize(#[from] TokenizeError),
    #[error("the model failed its warm-up pass: {0}")]
    Embed(#[from] EmbedError),
}

/// Runs one short input through `embedder`: the first pass pays for lazy set-up (allocations,
/// kernel loading), and a model that cannot run at all is found before any job is taken.
pub async fn warm_up<E: Embedder>(embedder: &E) -> Result<(), WarmUpError> {
    let token_ids = embedder.tokenize("warm up", true)?;
    embedder
        .embed(vec![TokenizedInput {
            token_ids,
            normalize: true,
        }])
        .await?;
    Ok(())
}
