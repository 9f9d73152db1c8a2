//! The Hugging Face directory loader, on a directory written from the default GGUF by
//! tests/reference/gguf_to_hf.py (float32 safetensors, q/k in Hugging Face layout,
//! tokenizer.json, tokenizer_config.json).

use std::process::Command;

use worker::engine::{generate_blocking, Engine, EngineConfig, GenRequest};
use worker::forward::BatchItem;
use worker::model::LoadedModel;
use worker::native;
use worker::quant::Precision;
use worker::sampling::SamplingParams;

use crate::{model, model_path, parity::python};

#[test]
fn safetensors_directory_matches_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    let status = Command::new(python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/gguf_to_hf.py"))
        .arg(model_path())
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let hf = LoadedModel::load(&out, false).unwrap();
    let gguf = model();
    assert_eq!(hf.default_model_id(), "smollm2-hf");

    let text = "<|im_start|>user\nCafé 2024 😀 — what's up?<|im_end|>\n";
    assert_eq!(hf.tokenizer.encode(text), gguf.tokenizer.encode(text));

    let prompt = gguf.tokenizer.encode("The capital of France is");
    let last_logits = |m: &worker::model::Model| {
        let mut cache = native::new_cache(m);
        native::forward(m, &mut [BatchItem { cache: &mut cache, tokens: &prompt, want_logits: true, all_logits: false }], Precision::Exact).unwrap().remove(0)
    };
    let (a, b) = (last_logits(&gguf.model), last_logits(&hf.model));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3, "max |gguf - hf| logit difference {diff}");

    let template = worker::chat::ChatTemplate::new(hf.chat_template.as_deref().unwrap(), "", "").unwrap();
    let rendered = template
        .render(&[worker::chat::ChatMessage::new("user", "What is the capital of France?")])
        .unwrap();
    let prompt = hf.tokenizer.encode(&rendered);
    let engine = Engine::start(std::sync::Arc::new(hf), EngineConfig::default());
    let req = GenRequest { prompt, params: SamplingParams { max_tokens: 40, ..Default::default() }, priority: 0, precision: Precision::Exact };
    assert_eq!(generate_blocking(&engine, req, |_| {}).0, "The capital of France is Paris.");
}
