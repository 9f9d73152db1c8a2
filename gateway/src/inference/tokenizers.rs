//! The model tokenizers the relay counts delivered tokens with, by model id. Each comes
//! from a `tokenizers` config entry (a `.gguf` file, whose header alone is read, a
//! Hugging Face model directory, or a `tokenizer.json`), loaded at start-up; `gateway
//! demo` adds the ones of the models its worker serves. A `tokenizer.json` whose model
//! is WordPiece belongs to an embedding model: `/v1/embeddings` counts (and checks)
//! its inputs with it, and the model's context comes from `max_position_embeddings` in
//! the `config.json` beside it (without one, the provider judges the length).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use tokenize::wordpiece::WordPiece;
use tokenize::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
#[error("config key `tokenizers.\"{model}\"` ({path}): {source}")]
pub struct TokenizerLoadError {
    pub model: String,
    pub path: PathBuf,
    pub source: TokenizerError,
}

/// An embedding model's tokenizer and context.
pub struct EmbeddingTokenizer {
    pub wordpiece: WordPiece,
    /// Tokens per input, `[CLS]` and `[SEP]` included, when the model's config says.
    pub max_positions: Option<usize>,
}

#[derive(Default)]
pub struct Tokenizers {
    by_model: RwLock<HashMap<String, Arc<Tokenizer>>>,
    embedding: RwLock<HashMap<String, Arc<EmbeddingTokenizer>>>,
}

impl Tokenizers {
    /// Loads every configured tokenizer; the first one that cannot be loaded is the error.
    pub fn load<'a>(sources: impl IntoIterator<Item = (&'a String, &'a PathBuf)>) -> Result<Tokenizers, TokenizerLoadError> {
        let tokenizers = Tokenizers::default();
        for (model, path) in sources {
            tokenizers.load_for(model, path)?;
        }
        Ok(tokenizers)
    }

    /// Loads the tokenizer at `path` for `model`, replacing any it had.
    pub fn load_for(&self, model: &str, path: &std::path::Path) -> Result<(), TokenizerLoadError> {
        let error = |source| TokenizerLoadError { model: model.to_owned(), path: path.to_owned(), source };
        let tokenizer = match tokenize::load(path) {
            Ok(t) => t,
            Err(TokenizerError::Model(_)) => return self.load_wordpiece(model, path).map_err(error),
            Err(e) => return Err(error(e)),
        };
        tracing::info!(model, path = %path.display(), vocab = tokenizer.vocab_size(), "tokenizer loaded");
        self.by_model.write().insert(model.to_owned(), Arc::new(tokenizer));
        Ok(())
    }

    fn load_wordpiece(&self, model: &str, path: &std::path::Path) -> Result<(), TokenizerError> {
        let json = if path.is_dir() { path.join("tokenizer.json") } else { path.to_owned() };
        let wordpiece = WordPiece::load(&json)?;
        let config = json.with_file_name("config.json");
        let max_positions = std::fs::read_to_string(&config)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|c| c["max_position_embeddings"].as_u64())
            .and_then(|n| usize::try_from(n).ok());
        tracing::info!(model, path = %json.display(), vocab = wordpiece.vocab_size(), ?max_positions, "embedding tokenizer loaded");
        self.embedding.write().insert(model.to_owned(), Arc::new(EmbeddingTokenizer { wordpiece, max_positions }));
        Ok(())
    }

    /// The tokenizer of an embedding model.
    pub fn embedding(&self, model: &str) -> Option<Arc<EmbeddingTokenizer>> {
        self.embedding.read().get(model).cloned()
    }

    pub fn get(&self, model: &str) -> Option<Arc<Tokenizer>> {
        self.by_model.read().get(model).cloned()
    }

    pub fn contains(&self, model: &str) -> bool {
        self.by_model.read().contains_key(model) || self.embedding.read().contains_key(model)
    }
}
