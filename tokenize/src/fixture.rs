//! A tiny byte-level BPE vocabulary written as a GGUF file and as Hugging Face
//! `tokenizer.json`, for the crate's unit tests.

use std::path::Path;

use serde_json::json;

use crate::tokenizer::bytes_to_unicode;

pub const EOS: &str = "<|endoftext|>";
pub const MERGES: [&str; 5] = ["h e", "l l", "he ll", "hell o", "Ġ w"];

/// The 256 byte tokens, the merged tokens, then `<|endoftext|>` (a control token).
pub fn tokens() -> Vec<String> {
    let mut t: Vec<String> = bytes_to_unicode().iter().map(char::to_string).collect();
    t.extend(["he", "ll", "hell", "hello", "Ġw"].map(str::to_string));
    t.push(EOS.to_string());
    t
}

pub fn id(token: &str) -> u32 {
    tokens().iter().position(|t| t == token).map_or(u32::MAX, |i| i as u32)
}

/// GGUF bytes: metadata, one Q4_0 tensor descriptor and `data_bytes` of tensor data.
pub fn gguf_bytes(data_bytes: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let tokens = tokens();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(6u64.to_le_bytes()); // metadata entries
    string(&mut out, "tokenizer.ggml.model");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "gpt2");
    string(&mut out, "tokenizer.ggml.tokens");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend((tokens.len() as u64).to_le_bytes());
    for t in &tokens {
        string(&mut out, t);
    }
    string(&mut out, "tokenizer.ggml.merges");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend((MERGES.len() as u64).to_le_bytes());
    for m in MERGES {
        string(&mut out, m);
    }
    string(&mut out, "tokenizer.ggml.token_type");
    out.extend(9u32.to_le_bytes());
    out.extend(5u32.to_le_bytes());
    out.extend((tokens.len() as u64).to_le_bytes());
    for t in &tokens {
        let ty: i32 = if t == EOS { 3 } else { 1 };
        out.extend(ty.to_le_bytes());
    }
    string(&mut out, "tokenizer.ggml.eos_token_id");
    out.extend(4u32.to_le_bytes());
    out.extend(id(EOS).to_le_bytes());
    string(&mut out, "tokenizer.ggml.add_bos_token");
    out.extend(7u32.to_le_bytes());
    out.push(0);
    // One tensor: 32 Q4_0 values (one 18-byte block) at offset 0 of the data section.
    string(&mut out, "blk.0.attn_q.weight");
    out.extend(1u32.to_le_bytes());
    out.extend(32u64.to_le_bytes());
    out.extend(2u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.resize(out.len() + data_bytes, 0x5a);
    out
}

/// The same vocabulary as a Hugging Face `tokenizer.json`.
pub fn tokenizer_json() -> serde_json::Value {
    let tokens = tokens();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().filter(|(_, t)| *t != EOS).map(|(i, t)| (t.clone(), json!(i))).collect();
    json!({
        "added_tokens": [{"id": id(EOS), "content": EOS, "special": true}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": MERGES},
    })
}

pub fn write(path: &Path, bytes: &[u8]) {
    if let Err(e) = std::fs::write(path, bytes) {
        panic!("cannot write {}: {e}", path.display());
    }
}
