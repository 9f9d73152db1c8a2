//! The BERT sentence encoder (`worker::bert`) on all-MiniLM-L6-v2 against an
//! independent numpy reference (tests/reference/bert_ref.py, float64) fed the token ids
//! Hugging Face `tokenizers` wrote (tokenize/tests/data/minilm_wordpiece.json). Fails
//! (never skips) when the model is missing, naming the script that fetches it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};
use worker::bert::{Encoder, Pooling};

use crate::parity::python;

pub fn minilm_dir() -> PathBuf {
    let dir = worker::fetch::cache_dir().join("all-MiniLM-L6-v2");
    assert!(dir.join("model.safetensors").exists(), "the embedding model is missing at {}: run `scripts/fetch-embedding-model.sh` first", dir.display());
    dir
}

pub fn minilm() -> &'static Encoder {
    static ENCODER: OnceLock<Encoder> = OnceLock::new();
    ENCODER.get_or_init(|| Encoder::load(&minilm_dir()).unwrap_or_else(|e| panic!("cannot load all-MiniLM-L6-v2: {e}")))
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}

#[test]
fn minilm_vectors_match_the_numpy_reference() {
    let enc = minilm();
    let c = &enc.config;
    assert_eq!((c.hidden, c.layers, c.heads, c.max_positions, c.vocab), (384, 6, 12, 512, 30522));
    assert_eq!((c.pooling, c.normalize), (Pooling::Mean, true));
    let golden: Value = serde_json::from_str(include_str!("../../../tokenize/tests/data/minilm_wordpiece.json")).unwrap();
    let ids: Vec<Vec<u32>> = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| case["ids"].as_array().unwrap().iter().map(|v| u32::try_from(v.as_u64().unwrap()).unwrap()).collect())
        .collect();
    assert!(ids.len() >= 20);
    let mut child = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/bert_ref.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let req = json!({"model": minilm_dir(), "ids": ids});
    child.stdin.take().unwrap().write_all(req.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let want: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
    let got = enc.embed_batch(&ids);
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), 384);
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "case {i}: |v| = {norm}");
        let d = cosine_distance(g, w);
        worst = worst.max(d);
        assert!(d < 1e-4, "case {i}: cosine distance {d} from the reference");
    }
    eprintln!("all-MiniLM-L6-v2: worst cosine distance from the numpy reference over {} sentences: {worst:e}", ids.len());
}

#[test]
fn related_sentences_are_closer_than_unrelated_ones() {
    let enc = minilm();
    let v = |t: &str| enc.embed(&enc.tokenizer.encode(t));
    let cat = v("A cat is sleeping on the sofa.");
    let kitten = v("A kitten naps on the couch.");
    let stocks = v("The stock market fell sharply after the interest rate decision.");
    let shares = v("Share prices dropped when the central bank raised rates.");
    assert!(cosine_distance(&cat, &kitten) < cosine_distance(&cat, &stocks));
    assert!(cosine_distance(&cat, &kitten) < cosine_distance(&cat, &shares));
    assert!(cosine_distance(&stocks, &shares) < cosine_distance(&stocks, &kitten));
    assert!(cosine_distance(&cat, &kitten) < 0.5 && cosine_distance(&cat, &stocks) > 0.7);
}
