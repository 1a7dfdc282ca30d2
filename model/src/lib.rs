//! BERT sentence-embedding model (all-MiniLM-L6-v2 and its kind) on candle, with the fused ops
//! of `fleet-kernels`, and a runtime that owns the device on its own OS thread.
//!
//! The model keeps its own forward pass (as text-embeddings-inference does) rather than using
//! candle-transformers: a batch is never padded. All tokens of all sequences are concatenated
//! into one `[T, hidden]` matrix for the linear layers, and attention runs per sequence
//! ("varlen", see `fleet_kernels`). Output equals sentence-transformers' mean pooling over the
//! attention mask, L2-normalised per input where asked.
//!
//! Tokenizing happens on the caller's side ([`EmbeddingModel::tokenize`] or
//! [`RuntimeHandle::tokenize`], both cheap next to the encoder): the worker learns an input's
//! token count, for batching by tokens and for refusing over-long inputs, before a batch is
//! formed; the runtime thread only runs the encoder.

mod bert;
mod config;
mod error;
mod precision;
mod runtime;
mod tokenizer;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::safetensors::MmapedSafetensors;

pub use config::{BertConfig, PoolingConfig, SentenceBertConfig};
pub use error::{FailureKind, ModelError};
pub use precision::{ParsePrecisionError, Precision, PrecisionUnavailable, Tolerance};
pub use runtime::{ModelRuntime, OwnedSequence, RuntimeHandle};
pub use tokenizer::TextTokenizer;

/// Most tokens run through the encoder at once. Sequences are independent, so a large batch
/// is run as consecutive chunks of about this many tokens with identical results; the
/// intermediate activations of a chunk (1536 floats per token) then stay small enough to be
/// reused from the allocator instead of mapped fresh (page faults) and streamed through
/// memory. At batch 128 this was 20% faster than one pass over all tokens.
const CHUNK_TOKENS: usize = 4096;

/// One tokenized input of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// Token ids with the special tokens, as [`EmbeddingModel::tokenize`] returns them.
    pub token_ids: &'a [u32],
    /// L2-normalise this input's vector.
    pub normalize: bool,
}

impl<'a> Sequence<'a> {
    /// An input whose vector is L2-normalised (what sentence-transformers gives by default
    /// with `normalize_embeddings=True`).
    pub fn normalized(token_ids: &'a [u32]) -> Self {
        Sequence {
            token_ids,
            normalize: true,
        }
    }
}

/// A loaded sentence-embedding model.
pub struct EmbeddingModel {
    config: BertConfig,
    precision: Precision,
    bert: bert::Bert,
    tokenizer: Arc<TextTokenizer>,
}

impl EmbeddingModel {
    /// Loads a sentence-transformers directory: `config.json`, `model.safetensors`
    /// (memory-mapped while the weights are read), `tokenizer.json`,
    /// `sentence_bert_config.json` (`max_seq_length`) and `1_Pooling/config.json` (which
    /// must ask for mean pooling alone). The linear layers run in [`Precision::Auto`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with_precision(dir, device, Precision::Auto)
    }

    /// [`load`](Self::load) with the linear layers in `precision`: `Auto` resolves to the
    /// fastest mode that meets the default accuracy contract here; an explicit mode this
    /// machine cannot run is [`ModelError::Precision`].
    pub fn load_with_precision(
        dir: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let precision = precision.resolve(device)?;
        let config: BertConfig = config::read_json(&dir.join("config.json"))?;
        config.validate()?;
        let st_config: SentenceBertConfig =
            config::read_json(&dir.join("sentence_bert_config.json"))?;
        let pooling_path = dir.join("1_Pooling").join("config.json");
        let pooling: PoolingConfig = config::read_json(&pooling_path)?;
        pooling.require_mean(&pooling_path, config.hidden_size)?;
        if st_config.max_seq_length == 0
            || st_config.max_seq_length > config.max_position_embeddings
        {
            return Err(ModelError::Unsupported(format!(
                "max_seq_length {} with {} position embeddings",
                st_config.max_seq_length, config.max_position_embeddings
            )));
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = TextTokenizer::load(&tokenizer_path, st_config.max_seq_length)?;
        // Every id the tokenizer can produce must have an embedding row, or one text of a
        // mismatched model directory would fail whole batches at run time.
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(ModelError::Config {
                path: tokenizer_path,
                message: format!(
                    "the tokenizer knows {} tokens, the model embeds {}",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        let weights_path = dir.join("model.safetensors");
        if !weights_path.is_file() {
            return Err(ModelError::Io {
                path: weights_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        // SAFETY: the file is mapped read-only and only read while `load` runs (the weights are
        // copied into tensors); nothing in this process writes to it meanwhile.
        let st =
            unsafe { MmapedSafetensors::new(&weights_path) }.map_err(|e| ModelError::Config {
                path: weights_path.clone(),
                message: e.to_string(),
            })?;
        let bert = bert::Bert::load(&st, &config, device, precision)?;
        Ok(Self {
            config,
            precision,
            bert,
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// The encoder's configuration (sizes, for cost models and reports).
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The precision the linear layers run in (resolved: never `Auto`).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Longest input in tokens, special tokens included (256 for all-MiniLM-L6-v2).
    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    /// Length of every embedding (384 for all-MiniLM-L6-v2).
    pub fn dimension(&self) -> usize {
        self.bert.hidden_size()
    }

    /// Tokenizes one text; with `truncate == false` a text longer than
    /// [`max_tokens`](Self::max_tokens) is `Err(ModelError::TooLong { tokens, max })`.
    pub fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, ModelError> {
        self.tokenizer.tokenize(text, truncate)
    }

    /// The tokenizer, shareable with other threads.
    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        Arc::clone(&self.tokenizer)
    }

    /// Embeds a batch of already tokenized sequences of any mix of lengths: one vector per
    /// sequence, in order, mean-pooled over its tokens, L2-normalised where `normalize` is
    /// true. An empty batch gives an empty result; a sequence with no tokens gives zeros.
    /// A sequence longer than [`max_tokens`](Self::max_tokens) is `TooLong`, a token id outside
    /// the vocabulary `InvalidTokenId`.
    pub fn embed(&self, batch: &[Sequence<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_with(batch, false)
    }

    /// [`embed`](Self::embed) through the candle custom ops (the path non-CPU devices take)
    /// even on the CPU, where `embed` calls the same kernels on slices. For tests that compare
    /// the two paths.
    #[doc(hidden)]
    pub fn embed_with_tensor_ops(
        &self,
        batch: &[Sequence<'_>],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.embed_with(batch, true)
    }

    fn embed_with(
        &self,
        batch: &[Sequence<'_>],
        tensor_ops: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let max = self.max_tokens();
        if let Some(s) = batch.iter().find(|s| s.token_ids.len() > max) {
            return Err(ModelError::TooLong {
                tokens: s.token_ids.len(),
                max,
            });
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut rest = batch;
        while !rest.is_empty() {
            // Consecutive sequences up to CHUNK_TOKENS tokens (at least one sequence).
            let mut tokens = 0;
            let take = rest
                .iter()
                .position(|s| {
                    tokens += s.token_ids.len();
                    tokens > CHUNK_TOKENS
                })
                .unwrap_or(rest.len())
                .max(1);
            let (chunk, tail) = rest.split_at(take);
            out.extend(self.bert.forward(chunk, tensor_ops)?);
            rest = tail;
        }
        Ok(out)
    }
}
