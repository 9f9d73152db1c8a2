//! The model tokenizers the relay counts delivered tokens with, by model id. Each comes
//! from a `tokenizers` config entry (a `.gguf` file, whose header alone is read, a
//! Hugging Face model directory, or a `tokenizer.json`), loaded at start-up; `gateway
//! demo` adds the one of the model its worker serves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use tokenize::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
#[error("config key `tokenizers.\"{model}\"` ({path}): {source}")]
pub struct TokenizerLoadError {
    pub model: String,
    pub path: PathBuf,
    pub source: TokenizerError,
}

#[derive(Default)]
pub struct Tokenizers {
    by_model: RwLock<HashMap<String, Arc<Tokenizer>>>,
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
        let tokenizer = tokenize::load(path).map_err(|source| TokenizerLoadError {
            model: model.to_owned(),
            path: path.to_owned(),
            source,
        })?;
        tracing::info!(model, path = %path.display(), vocab = tokenizer.vocab_size(), "tokenizer loaded");
        self.by_model.write().insert(model.to_owned(), Arc::new(tokenizer));
        Ok(())
    }

    pub fn get(&self, model: &str) -> Option<Arc<Tokenizer>> {
        self.by_model.read().get(model).cloned()
    }

    pub fn contains(&self, model: &str) -> bool {
        self.by_model.read().contains_key(model)
    }
}
