//! The JSON files of a sentence-transformers model directory.

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::ModelError;

/// The parts of Hugging Face's `config.json` for BERT that the forward pass uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Rejects configurations this implementation would compute wrongly.
    pub(crate) fn validate(&self) -> Result<(), ModelError> {
        let unsupported = |m: String| Err(ModelError::Unsupported(m));
        if self.hidden_act != "gelu" {
            return unsupported(format!(
                "hidden_act `{}` (only the erf `gelu`)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return unsupported(format!(
                "position_embedding_type `{}` (only `absolute`)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || self.hidden_size == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return unsupported(format!(
                "hidden_size {} over {} attention heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.type_vocab_size == 0 || self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return unsupported("empty vocabulary or embedding table".into());
        }
        Ok(())
    }
}

/// `sentence_bert_config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SentenceBertConfig {
    pub max_seq_length: usize,
}

/// `1_Pooling/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolingConfig {
    pub word_embedding_dimension: usize,
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
    #[serde(default)]
    pub pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pub pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_lasttoken: bool,
}

impl PoolingConfig {
    /// Mean pooling alone, over `hidden_size` values; anything else is an error.
    pub(crate) fn require_mean(&self, path: &Path, hidden_size: usize) -> Result<(), ModelError> {
        let others = [
            ("cls_token", self.pooling_mode_cls_token),
            ("max_tokens", self.pooling_mode_max_tokens),
            (
                "mean_sqrt_len_tokens",
                self.pooling_mode_mean_sqrt_len_tokens,
            ),
            ("weightedmean_tokens", self.pooling_mode_weightedmean_tokens),
            ("lasttoken", self.pooling_mode_lasttoken),
        ];
        let on: Vec<&str> = others.iter().filter(|(_, v)| *v).map(|(k, _)| *k).collect();
        let message = if !self.pooling_mode_mean_tokens {
            Some("pooling_mode_mean_tokens is not set".to_string())
        } else if !on.is_empty() {
            Some(format!(
                "other pooling modes are set too: {}",
                on.join(", ")
            ))
        } else if self.word_embedding_dimension != hidden_size {
            Some(format!(
                "word_embedding_dimension {} but hidden_size {hidden_size}",
                self.word_embedding_dimension
            ))
        } else {
            None
        };
        match message {
            Some(message) => Err(ModelError::UnsupportedPooling {
                path: path.to_path_buf(),
                message,
            }),
            None => Ok(()),
        }
    }
}

/// Reads and parses a JSON file into `T`.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
