//! WordPiece against Hugging Face `tokenizers` on a real model's file: the ids in
//! `data/minilm_wordpiece.json` were written by that library (its version is in the
//! file) from all-MiniLM-L6-v2's `tokenizer.json`. Fails (never skips) when the model is
//! missing, naming the script that fetches it.
// This whole file is tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use tokenize::wordpiece::WordPiece;

const FETCH: &str = "cargo run -p worker -- fetch-model --embedding";

fn tokenizer_json() -> PathBuf {
    let path = common::models_dir().join("all-MiniLM-L6-v2/tokenizer.json");
    assert!(path.exists(), "the embedding model is missing at {}: run `{FETCH}` first", path.display());
    path
}

#[test]
fn encodes_like_hugging_face_tokenizers() {
    let tokenizer = WordPiece::load(&tokenizer_json()).unwrap();
    assert_eq!(tokenizer.vocab_size(), 30522);
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("data/minilm_wordpiece.json")).expect("the golden file is JSON");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut different = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| u32::try_from(v.as_u64().unwrap()).unwrap()).collect();
        let got = tokenizer.encode(text);
        if got != want {
            different.push(format!("{text:?}\n  got  {got:?}\n  want {want:?}"));
        }
    }
    assert!(different.is_empty(), "{} of {} differ:\n{}", different.len(), cases.len(), different.join("\n"));
}
