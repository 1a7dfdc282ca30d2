//! Text to token ids, with the model's length limit.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::ModelError;

/// The model's `tokenizer.json`, loaded twice: once without truncation (to count the tokens
/// of a text and refuse it when too long) and once truncating at `max_tokens`, special
/// tokens included, exactly as sentence-transformers does. Padding, which `tokenizer.json`
/// files often switch on, is switched off: the model takes sequences of any length unpadded.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    whole: Tokenizer,
    truncating: Tokenizer,
    max_tokens: usize,
}

impl TextTokenizer {
    pub(crate) fn load(path: &Path, max_tokens: usize) -> Result<Self, ModelError> {
        let load_err = |message: String| ModelError::TokenizerLoad {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let mut whole = Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        whole.with_padding(None);
        whole
            .with_truncation(None)
            .map_err(|e| load_err(e.to_string()))?;
        // Truncation keeps the special tokens and cuts the text: the limit must leave room
        // for at least one text token, or truncating underflows inside the tokenizer.
        let special = whole
            .encode("", true)
            .map_err(|e| load_err(e.to_string()))?
            .len();
        if max_tokens <= special {
            return Err(load_err(format!(
                "a maximum of {max_tokens} tokens leaves no room for text beside {special} special tokens"
            )));
        }
        let mut truncating = whole.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_err(e.to_string()))?;
        Ok(Self {
            whole,
            truncating,
            max_tokens,
        })
    }

    /// Longest sequence, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Tokens the tokenizer can produce, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.whole.get_vocab_size(true)
    }

    /// Token ids of `text` with the special tokens (`[CLS] ... [SEP]` for BERT; an empty text
    /// gives just those). Longer than [`max_tokens`](Self::max_tokens): cut to it when
    /// `truncate`, else [`ModelError::TooLong`].
    pub fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, ModelError> {
        let tokenizer = if truncate {
            &self.truncating
        } else {
            &self.whole
        };
        let encoding = tokenizer
            .encode_fast(text, true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        let ids = encoding.get_ids();
        if ids.len() > self.max_tokens {
            return Err(ModelError::TooLong {
                tokens: ids.len(),
                max: self.max_tokens,
            });
        }
        Ok(ids.to_vec())
    }
}
