//! The tokenizer of the default model (SmolLM2-135M-Instruct), read from the GGUF
//! header alone. Fails (never skips) when the model is missing, naming the command
//! that fetches it.
// This whole file is tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use tokenize::Tokenizer;

const FETCH_COMMAND: &str = "cargo run -p worker -- fetch-model";

/// Where `worker fetch-model` puts the default model (worker/src/fetch.rs), or
/// `WORKER_TEST_MODEL`.
fn model_path() -> PathBuf {
    let path = std::env::var_os("WORKER_TEST_MODEL")
        .map_or_else(|| common::models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"), PathBuf::from);
    assert!(path.exists(), "the default model is missing at {}: run `{FETCH_COMMAND}` first", path.display());
    path
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| tokenize::load(&model_path()).unwrap_or_else(|e| panic!("cannot load the default model's tokenizer: {e}")))
}

#[test]
fn round_trips_ascii_digits_accents_cjk_and_emoji() {
    let tok = tokenizer();
    for text in [
        "Hello, world! How are you today?",
        "1234567890 and 3.14159, 2+2=4",
        "Café, naïve façade, Ærøskøbing, ¿Qué tal?",
        "日本語のテキストと中文文本",
        "Emoji: 😀🚀👍🏽 family 👨‍👩‍👧",
        "  leading spaces\n\nnew lines\ttabs  ",
    ] {
        let ids = tok.encode(text);
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids), text, "round trip of {text:?} via {ids:?}");
    }
}

#[test]
fn encodes_like_the_reference_tokenizer() {
    let tok = tokenizer();
    // Special tokens are atomic and digits are split one by one (SmolLM pre-tokenizer).
    let ids = tok.encode("<|im_start|>user\n2024<|im_end|>");
    assert_eq!(ids.first(), tok.token_id("<|im_start|>").as_ref());
    assert_eq!(ids.last(), tok.token_id("<|im_end|>").as_ref());
    let digits: Vec<_> = ids[ids.len() - 5..ids.len() - 1].iter().map(|&t| tok.token_str(t).to_string()).collect();
    assert_eq!(digits, ["2", "0", "2", "4"]);
    // " Paris" is one token with the byte-level space marker.
    let paris = tok.encode(" Paris");
    assert_eq!(paris.len(), 1);
    assert_eq!(tok.token_str(paris[0]), "ĠParis");
}

#[test]
fn counts_a_completion_without_prompt_tokens() {
    let tok = tokenizer();
    // What the gateway counts: the delivered text's tokens, with no BOS or EOS added.
    let ids = tok.encode_text("The capital of France is Paris.");
    let pieces: Vec<&str> = ids.iter().map(|&t| tok.token_str(t)).collect();
    assert_eq!(pieces, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]);
}
