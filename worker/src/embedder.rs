//! What the batcher needs from a model: tokenize once per input, embed a batch of token
//! sequences. The real model sits behind this trait, so the pipeline can be exercised (and
//! specified by tests) with a fast deterministic stand-in.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

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

/// A failure of the model runtime on a batch; the jobs in it may succeed when retried.
#[derive(Debug, thiserror::Error)]
#[error("model runtime failed on a batch: {0}")]
pub struct EmbedError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

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

/// A deterministic stand-in for a model, for tests of the pipeline: a token is a word, its id a
/// hash of the word, and a vector counts token ids into `dimension` buckets. Equal texts get
/// equal vectors; it records every batch it is asked to embed. Clones share that record.
#[derive(Clone)]
pub struct FakeEmbedder {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    dimension: usize,
    max_tokens: usize,
    delay: Mutex<Duration>,
    batches: Mutex<Vec<Vec<TokenizedInput>>>,
    failures_left: AtomicUsize,
}

impl FakeEmbedder {
    pub fn new(dimension: usize, max_tokens: usize) -> FakeEmbedder {
        FakeEmbedder {
            inner: Arc::new(FakeInner {
                dimension,
                max_tokens,
                delay: Mutex::new(Duration::ZERO),
                batches: Mutex::new(Vec::new()),
                failures_left: AtomicUsize::new(0),
            }),
        }
    }

    /// From now on every `embed` takes this long, like a slow model would.
    pub fn set_delay(&self, delay: Duration) {
        if let Ok(mut current) = self.inner.delay.lock() {
            *current = delay;
        }
    }

    /// The next `count` calls to `embed` fail, like a model runtime in trouble.
    pub fn fail_next(&self, count: usize) {
        self.inner.failures_left.store(count, Ordering::SeqCst);
    }

    /// The batches embedded so far, in call order.
    pub fn batches(&self) -> Vec<Vec<TokenizedInput>> {
        self.inner
            .batches
            .lock()
            .map(|batches| batches.clone())
            .unwrap_or_default()
    }

    /// The vector this embedder gives `text` (untruncated).
    pub fn expected_vector(&self, text: &str, normalize: bool) -> Vec<f32> {
        self.vector(&word_ids(text), normalize)
    }

    fn vector(&self, token_ids: &[u32], normalize: bool) -> Vec<f32> {
        let dimension = self.inner.dimension;
        let mut vector = vec![0.0f32; dimension];
        for id in token_ids {
            vector[*id as usize % dimension] += 1.0;
        }
        if normalize {
            let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                vector.iter_mut().for_each(|x| *x /= norm);
            }
        }
        vector
    }
}

fn word_ids(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|word| {
            // FNV-1a: stable across runs and platforms, unlike the std hasher.
            word.bytes().fold(0x811c_9dc5u32, |hash, byte| {
                (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
            })
        })
        .collect()
}

impl Embedder for FakeEmbedder {
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }

    fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = word_ids(text);
        let max = self.inner.max_tokens;
        if ids.len() > max {
            if !truncate {
                return Err(TokenizeError::TooLong {
                    tokens: ids.len(),
                    max,
                });
            }
            ids.truncate(max);
        }
        Ok(ids)
    }

    fn embed(
        &self,
        batch: Vec<TokenizedInput>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, EmbedError>> {
        let this = self.clone();
        Box::pin(async move {
            if let Ok(mut batches) = this.inner.batches.lock() {
                batches.push(batch.clone());
            }
            let delay = this.inner.delay.lock().map(|d| *d).unwrap_or_default();
            tokio::time::sleep(delay).await;
            let fail = this
                .inner
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(EmbedError("injected failure".into()));
            }
            Ok(batch
                .iter()
                .map(|input| this.vector(&input.token_ids, input.normalize))
                .collect())
        })
    }
}
