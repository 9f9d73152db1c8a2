//! Logits parity with an independent numpy implementation (tests/reference/llama_ref.py)
//! that reads the GGUF itself and computes in float64 without a KV cache.

use std::path::PathBuf;
use std::process::Command;

use worker::forward::BatchItem;
use worker::model::Model;
use worker::native;
use worker::quant::Precision;
use worker::sampling::argmax;

use crate::{model, model_path};

/// Largest allowed |ours - reference| for any logit (logits span about ±30; the
/// reference is float64, ours f32 with a KV cache).
const TOLERANCE: f32 = 1e-3;

pub fn python() -> PathBuf {
    let path = std::env::var_os("WORKER_REFERENCE_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/.venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "numpy reference interpreter missing at {}: run `worker/scripts/setup-reference.sh` first",
        path.display()
    );
    path
}

/// Runs the reference once for all cases: logits for every prompt position and
/// `steps` greedy tokens each.
fn reference(cases: &[(Vec<u32>, usize)], vocab: usize) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    use std::io::Write;
    let out = tempfile::NamedTempFile::new().unwrap();
    let jobs: Vec<_> = cases.iter().map(|(t, s)| serde_json::json!({"tokens": t, "steps": s})).collect();
    let mut child = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/llama_ref.py"))
        .arg(model_path())
        .arg(out.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(serde_json::to_string(&jobs).unwrap().as_bytes()).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "reference failed: {status}");
    let bytes = std::fs::read(out.path()).unwrap();
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut at = 0;
    let mut results = Vec::new();
    for (tokens, steps) in cases {
        let n = tokens.len() * vocab;
        let logits = floats[at..at + n].chunks_exact(vocab).map(<[f32]>::to_vec).collect();
        let greedy = floats[at + n..at + n + steps].iter().map(|&f| f as u32).collect();
        at += n + steps;
        results.push((logits, greedy));
    }
    assert_eq!(at, floats.len());
    results
}

/// Our logits at every position (one token per step, through the KV cache), then
/// `steps` greedy tokens.
fn ours(m: &Model, tokens: &[u32], steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut cache = native::new_cache(m);
    let mut logits = Vec::new();
    for t in tokens {
        let mut items = [BatchItem { cache: &mut cache, tokens: std::slice::from_ref(t), want_logits: true, all_logits: false }];
        logits.push(native::forward(m, &mut items, Precision::Exact).unwrap().remove(0));
    }
    let mut greedy = Vec::new();
    let mut last = logits.last().cloned().unwrap();
    for _ in 0..steps {
        let t = argmax(&last);
        greedy.push(t);
        let mut items = [BatchItem { cache: &mut cache, tokens: &[t], want_logits: true, all_logits: false }];
        last = native::forward(m, &mut items, Precision::Exact).unwrap().remove(0);
    }
    (logits, greedy)
}

#[test]
fn logits_match_the_numpy_reference() {
    let m = model();
    let vocab = m.model.config.vocab_size;
    let tok = &m.tokenizer;
    let chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let cases: [(&str, usize); 3] =
        [(chat, 32), ("The quick brown fox jumps over the lazy dog.", 0), ("In 1969, Apollo 11 — café ☕ 東京", 0)];
    let encoded: Vec<(Vec<u32>, usize)> = cases.iter().map(|(text, steps)| (tok.encode(text), *steps)).collect();
    let references = reference(&encoded, vocab);
    let mut worst = 0f32;
    for (((text, _), (tokens, steps)), (want, want_greedy)) in cases.iter().zip(&encoded).zip(references) {
        let (got, got_greedy) = ours(&m.model, tokens, *steps);
        for (pos, (w, g)) in want.iter().zip(&got).enumerate() {
            let diff = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(diff);
            assert!(diff <= TOLERANCE, "{text:?} position {pos}: max |diff| {diff} > {TOLERANCE}");
        }
        assert_eq!(got_greedy, want_greedy, "{text:?}: greedy tokens differ");
    }
    eprintln!("worst logit difference from the numpy reference: {worst}");
}
