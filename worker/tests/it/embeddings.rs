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
    assert!(dir.join("model.safetensors").exists(), "the embedding model is missing at {}: run `cargo run -p worker -- fetch-model --embedding` first", dir.display());
    dir
}

pub fn minilm() -> &'static Encoder {
    static ENCODER: OnceLock<Encoder> = OnceLock::new();
    ENCODER.get_or_init(|| Encoder::load(&minilm_dir()).unwrap_or_else(|e| panic!("cannot load all-MiniLM-L6-v2: {e}")))
}

/// The token ids Hugging Face `tokenizers` wrote for the golden sentences.
pub fn golden_ids() -> Vec<Vec<u32>> {
    let golden: Value = serde_json::from_str(include_str!("../../../tokenize/tests/data/minilm_wordpiece.json")).unwrap();
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| case["ids"].as_array().unwrap().iter().map(|v| u32::try_from(v.as_u64().unwrap()).unwrap()).collect())
        .collect()
}

/// The worst cosine distance between `encode`'s vectors and the native encoder's, over
/// the golden sentences batched together, and between a sentence encoded alone and in
/// that batch (padding must not change it).
pub fn against_native(encode: &dyn worker::embeddings::Encode, ids: &[Vec<u32>]) -> (f64, f64) {
    let native = minilm().embed_batch(ids);
    let batched = encode.embed_batch(ids);
    assert_eq!(batched.len(), ids.len());
    let worst = native.iter().zip(&batched).map(|(n, b)| cosine_distance(n, b)).fold(0.0, f64::max);
    let shortest = (0..ids.len()).min_by_key(|&i| ids[i].len()).unwrap();
    let alone = encode.embed_batch(&ids[shortest..=shortest]).remove(0);
    (worst, cosine_distance(&alone, &batched[shortest]))
}

pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
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
    let ids = golden_ids();
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

/// The encoder on burn (here burn-ndarray; `wgpu.rs` runs it on lavapipe): the same
/// vectors as the native encoder, padded batches included.
#[test]
fn burn_ndarray_encoder_matches_the_native_one() {
    let encoder = worker::burn_bert::BurnEncoder::<burn::backend::NdArray>::new(minilm(), Default::default());
    let (worst, padded) = against_native(&encoder, &golden_ids());
    eprintln!("burn-ndarray encoder: worst cosine distance from native {worst:e}; alone vs padded in a batch {padded:e}");
    assert!(worst < 1e-6 && padded < 1e-6, "{worst:e} {padded:e}");
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

/// A worker serving the default chat model and all-MiniLM-L6-v2 beside it.
fn serving() -> worker::server::AppState {
    let m = crate::model();
    let engine = worker::engine::Engine::start(m.clone(), worker::engine::EngineConfig::default());
    let encoder = Encoder::load(&minilm_dir()).unwrap();
    let embedder = worker::embeddings::Embedder::start(encoder, "all-minilm-l6-v2".into());
    worker::server::AppState::new(engine, m.default_model_id()).with_embedder(embedder)
}

fn error_param(status: axum::http::StatusCode, body: &str) -> (u16, String) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    (status.as_u16(), v["error"]["param"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn embeddings_endpoint_answers_every_input_form_and_refuses_bad_ones() {
    use base64::Engine as _;
    let st = serving();
    let enc = minilm();
    let post = |body: Value| {
        let st = st.clone();
        async move { crate::call(&st, "POST", "/v1/embeddings", Some(body)).await }
    };
    let text = "The quick brown fox jumps over the lazy dog.";
    let want = enc.embed(&enc.tokenizer.encode(text));
    // A string.
    let (status, body) = post(json!({"model": "all-minilm-l6-v2", "input": text})).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("list"), Some("all-minilm-l6-v2")));
    let got: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(got, want);
    let n = enc.tokenizer.encode(text).len();
    assert_eq!(v["usage"], json!({"prompt_tokens": n, "total_tokens": n}));
    // Strings, token ids, arrays of token ids: the same text gives the same vector.
    let ids = enc.tokenizer.encode_text(text);
    for input in [json!([text, "another sentence"]), json!(ids), json!([ids, ids])] {
        let (status, body) = post(json!({"model": "all-minilm-l6-v2", "input": input})).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let first: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
        assert_eq!(first, want, "{input}");
        assert_eq!(v["data"][0]["index"], 0);
    }
    // base64: little-endian f32 of the same vector; dimensions equal to the model's.
    let (status, body) = post(json!({"model": "all-minilm-l6-v2", "input": text, "encoding_format": "base64", "dimensions": 384})).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(v["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(floats, want);
    // Longer than the 512-token context: refused naming `input`, unless `truncate`.
    let long = "word ".repeat(600);
    let (status, body) = post(json!({"model": "all-minilm-l6-v2", "input": long})).await;
    assert_eq!(error_param(status, &body), (400, "input".into()));
    assert!(body.contains("more than this model's context of 512"), "{body}");
    let (status, body) = post(json!({"model": "all-minilm-l6-v2", "input": long, "truncate": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["usage"]["prompt_tokens"], 512);
    // Every refusal is an OpenAI-shaped error naming its parameter.
    let refusals = [
        (json!({"model": "all-minilm-l6-v2", "input": [30522]}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2", "input": []}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2", "input": ""}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2", "input": [[]]}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2", "input": [1, "a"]}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2", "input": vec!["a"; 2049]}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2"}), 400, "input"),
        (json!({"model": "all-minilm-l6-v2", "input": "a", "dimensions": 256}), 400, "dimensions"),
        (json!({"model": "all-minilm-l6-v2", "input": "a", "encoding_format": "hex"}), 400, "encoding_format"),
        (json!({"model": "text-embedding-3-small", "input": "a"}), 404, "model"),
        (json!({"model": "smollm2-135m-instruct", "input": "a"}), 404, "model"),
    ];
    for (req, code, param) in refusals {
        let (status, body) = post(req.clone()).await;
        assert_eq!(error_param(status, &body), (code, param.to_string()), "{req}: {body}");
    }
    // The embedding model is listed beside the chat model.
    let (_, body) = crate::call(&st, "GET", "/v1/models", None).await;
    assert!(body.contains("\"all-minilm-l6-v2\""), "{body}");
}

#[tokio::test]
async fn concurrent_embedding_requests_share_batches() {
    let st = serving();
    let texts: Vec<String> = (0..16).map(|i| format!("Sentence number {i} about a different topic each time, {i}.")).collect();
    let calls = texts.iter().map(|t| {
        let st = st.clone();
        let t = t.clone();
        async move { crate::call(&st, "POST", "/v1/embeddings", Some(json!({"model": "all-minilm-l6-v2", "input": [t.clone(), t]}))).await }
    });
    let answers = futures::future::join_all(calls).await;
    let enc = minilm();
    for (t, (status, body)) in texts.iter().zip(&answers) {
        assert_eq!(*status, 200, "{body}");
        let v: Value = serde_json::from_str(body).unwrap();
        let got: Vec<f32> = serde_json::from_value(v["data"][1]["embedding"].clone()).unwrap();
        assert_eq!(got, enc.embed(&enc.tokenizer.encode(t)), "a caller got another caller's vector");
    }
    let (_, metrics) = crate::call(&st, "GET", "/metrics", None).await;
    let counter = |name: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!((counter("worker_embedding_requests_total"), counter("worker_embedding_inputs_total")), (16, 32));
    let batches = counter("worker_embedding_batches_total");
    assert!((1..=16).contains(&batches), "{batches} batches");
    eprintln!("16 concurrent requests were encoded in {batches} batches");
}
