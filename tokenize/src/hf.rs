//! Hugging Face tokenizer files: `tokenizer.json` (byte-level BPE), with the special
//! tokens that `tokenizer_config.json` and `config.json` next to it name.

use std::path::Path;

use serde_json::Value;

use crate::tokenizer::{Tokenizer, TokenizerError};

/// End-of-sequence tokens to fall back on when no file next to `tokenizer.json` names one.
const KNOWN_EOS: [&str; 7] = ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>", "<end_of_turn>"];

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let shown = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: shown(), source })?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Json { path: shown(), message: e.to_string() })
}

fn token_string(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v["content"].as_str().map(str::to_string))
}

/// Loads `tokenizer.json` at `path`. BOS, EOS and whether to add BOS come from
/// `tokenizer_config.json` and `config.json` in the same directory when they exist.
pub fn load(path: &Path) -> Result<Tokenizer, TokenizerError> {
    let tok_json = read_json(path)?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let optional = |name: &str| {
        let p = dir.join(name);
        if p.is_file() { read_json(&p) } else { Ok(Value::Null) }
    };
    let tok_cfg = optional("tokenizer_config.json")?;
    let cfg = optional("config.json")?;
    let bos = token_string(&tok_cfg["bos_token"]);
    let mut eos: Vec<String> = token_string(&tok_cfg["eos_token"]).into_iter().collect();
    // config.json may name more end-of-sequence ids (Llama 3 lists several).
    let vocab = &tok_json["model"]["vocab"];
    let eos_ids: Vec<u64> = match &cfg["eos_token_id"] {
        Value::Number(n) => n.as_u64().into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    };
    for id in eos_ids {
        let by_vocab = vocab.as_object().and_then(|m| m.iter().find(|(_, v)| v.as_u64() == Some(id)).map(|(k, _)| k.clone()));
        let by_added = tok_json["added_tokens"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["id"].as_u64() == Some(id)))
            .and_then(|t| t["content"].as_str().map(str::to_string));
        if let Some(s) = by_added.or(by_vocab) {
            if !eos.contains(&s) {
                eos.push(s);
            }
        }
    }
    if eos.is_empty() {
        // A tokenizer.json on its own names no end token; the usual names serve.
        let added = tok_json["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
        let known = |name: &str| {
            vocab.get(name).is_some() || added.iter().any(|t| t["content"].as_str() == Some(name))
        };
        eos.extend(KNOWN_EOS.iter().filter(|n| known(n)).map(|n| (*n).to_string()));
    }
    let add_bos = tok_cfg["add_bos_token"].as_bool().unwrap_or_else(|| {
        // Llama 3 style: the post-processor template starts with the BOS token.
        let single = tok_json["post_processor"]["single"].to_string();
        bos.as_ref().is_some_and(|b| single.contains(b.as_str()))
    });
    Tokenizer::from_hf_json(&tok_json, bos.as_deref(), &eos, add_bos)
}
