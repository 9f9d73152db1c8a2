//! Byte-level BPE tokenizer (GGUF `tokenizer.ggml.model = "gpt2"`) built from the
//! model's own vocabulary, merges and pre-tokenizer name.

use std::collections::HashMap;

use fancy_regex::Regex;

use crate::gguf::{GgufError, GgufHeader, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer model {0:?} (only byte-level BPE \"gpt2\" is supported)")]
    Model(String),
    #[error("tokenizer.json's model is {0:?}, not WordPiece")]
    NotWordPiece(String),
    #[error("tokenizer metadata is missing {0}")]
    Missing(&'static str),
    #[error("bad pre-tokenizer regex: {0}")]
    Regex(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not valid JSON: {message}")]
    Json { path: String, message: String },
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct Tokenizer {
    tokens: Vec<String>,
    /// Bytes each token stands for (control tokens: their literal text).
    token_bytes: Vec<Vec<u8>>,
    is_control: Vec<bool>,
    vocab: HashMap<String, u32>,
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_token: [u32; 256],
    /// Special tokens matched literally in input text, longest first.
    specials: Vec<(String, u32)>,
    /// Pre-tokenizer stages applied in order; each splits every piece further.
    stages: Vec<Regex>,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Extra tokens that end generation (e.g. `<|eot_id|>`, `<|im_end|>`).
    pub eos_set: Vec<u32>,
    pub add_bos: bool,
}

/// Pre-tokenizer regexes for a GGUF `tokenizer.ggml.pre` name.
pub fn patterns_for(pre: &str) -> Vec<String> {
    let p: Vec<&str> = match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => vec![LLAMA3_PATTERN],
        "qwen2" | "deepseek-r1-qwen" => vec![QWEN2_PATTERN],
        // SmolLM, StarCoder and friends: digits are split one by one first.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2_PATTERN]
        }
        _ => vec![GPT2_PATTERN],
    };
    p.into_iter().map(str::to_string).collect()
}

/// Pre-tokenizer regexes from a `tokenizer.json` `pre_tokenizer` object.
fn hf_patterns(pre: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let stages: Vec<&serde_json::Value> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"].as_array().map(|a| a.iter().collect()).unwrap_or_default(),
        Some(_) => vec![pre],
        None => Vec::new(),
    };
    for s in stages {
        match s["type"].as_str() {
            Some("Digits") if s["individual_digits"].as_bool() == Some(true) => out.push(r"\p{N}".to_string()),
            Some("Digits") => out.push(r"\p{N}+".to_string()),
            Some("Split") => {
                if let Some(r) = s["pattern"]["Regex"].as_str().or(s["pattern"]["String"].as_str()) {
                    out.push(r.to_string());
                }
            }
            Some("ByteLevel") if s["use_regex"].as_bool() != Some(false) => out.push(GPT2_PATTERN.to_string()),
            _ => {}
        }
    }
    if out.is_empty() {
        out.push(GPT2_PATTERN.to_string());
    }
    out
}

/// GPT-2's reversible byte → printable char mapping.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        map[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    map
}

fn str_array(g: &GgufHeader, key: &'static str) -> Result<Vec<String>, TokenizerError> {
    let arr = g.metadata.get(key).and_then(Value::as_array).ok_or(TokenizerError::Missing(key))?;
    Ok(arr.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect())
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF header (`tokenizer.ggml.*` metadata); the worker
    /// passes its whole model file, the gateway a header read on its own.
    pub fn from_gguf<G: AsRef<GgufHeader> + ?Sized>(g: &G) -> Result<Tokenizer, TokenizerError> {
        let g = g.as_ref();
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("gpt2");
        if model != "gpt2" {
            return Err(TokenizerError::Model(model.to_string()));
        }
        let tokens = str_array(g, "tokenizer.ggml.tokens")?;
        let merges = str_array(g, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = g
            .metadata
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let id = |k: &str| g.metadata.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let eos = id("tokenizer.ggml.eos_token_id").ok_or(TokenizerError::Missing("tokenizer.ggml.eos_token_id"))?;
        let bos = id("tokenizer.ggml.bos_token_id");
        let add_bos = g.metadata.get("tokenizer.ggml.add_bos_token").and_then(Value::as_u64).unwrap_or(0) != 0;
        let mut eos_set = vec![eos];
        if let Some(e) = id("tokenizer.ggml.eot_token_id") {
            eos_set.push(e);
        }
        Tokenizer::new(tokens, &merges, &types, &patterns_for(pre), bos, eos, eos_set, add_bos)
    }

    /// Builds the tokenizer of a Hugging Face `tokenizer.json` (byte-level BPE only).
    pub fn from_hf_json(
        json: &serde_json::Value,
        bos: Option<&str>,
        eos: &[String],
        add_bos: bool,
    ) -> Result<Tokenizer, TokenizerError> {
        let model = &json["model"];
        if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
            return Err(TokenizerError::Model(format!("{} (byte-level BPE only)", model["type"])));
        }
        let vocab = model["vocab"].as_object().ok_or(TokenizerError::Missing("model.vocab"))?;
        let mut by_id: Vec<(u32, String)> =
            vocab.iter().filter_map(|(t, id)| Some((id.as_u64()? as u32, t.clone()))).collect();
        let mut types: HashMap<u32, u64> = HashMap::new();
        for a in json["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
            let id = id as u32;
            if !by_id.iter().any(|(i, _)| *i == id) {
                by_id.push((id, content.to_string()));
            }
            types.insert(id, if a["special"].as_bool() == Some(true) { 3 } else { 4 });
        }
        by_id.sort();
        let n = by_id.last().map_or(0, |(i, _)| *i as usize + 1);
        let mut tokens = vec![String::new(); n];
        for (i, t) in by_id {
            tokens[i as usize] = t;
        }
        let types: Vec<u64> = (0..n as u32).map(|i| types.get(&i).copied().unwrap_or(1)).collect();
        let merges: Vec<String> = model["merges"]
            .as_array()
            .ok_or(TokenizerError::Missing("model.merges"))?
            .iter()
            .filter_map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                _ => None,
            })
            .collect();
        let patterns = hf_patterns(&json["pre_tokenizer"]);
        let id_of = |s: &str| tokens.iter().position(|t| t == s).map(|i| i as u32);
        let eos_ids: Vec<u32> = eos.iter().filter_map(|s| id_of(s)).collect();
        let eos0 = *eos_ids.first().ok_or(TokenizerError::Missing("eos token"))?;
        let bos = bos.and_then(id_of);
        Tokenizer::new(tokens.clone(), &merges, &types, &patterns, bos, eos0, eos_ids, add_bos)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tokens: Vec<String>,
        merges: &[String],
        types: &[u64],
        patterns: &[String],
        bos: Option<u32>,
        eos: u32,
        mut eos_set: Vec<u32>,
        add_bos: bool,
    ) -> Result<Tokenizer, TokenizerError> {
        let b2u = bytes_to_unicode();
        let mut u2b: HashMap<char, u8> = HashMap::new();
        for (b, c) in b2u.iter().enumerate() {
            u2b.insert(*c, b as u8);
        }
        let vocab: HashMap<String, u32> =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        // Token types 3 (control) and 4 (user defined) are atomic: never split by BPE.
        let is_special: Vec<bool> =
            (0..tokens.len()).map(|i| matches!(types.get(i), Some(3) | Some(4))).collect();
        let is_control: Vec<bool> = (0..tokens.len()).map(|i| types.get(i) == Some(&3)).collect();
        let token_bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&is_special)
            .map(|(t, &sp)| {
                if sp {
                    t.as_bytes().to_vec()
                } else {
                    t.chars().map(|c| u2b.get(&c).copied().unwrap_or(b'?')).collect()
                }
            })
            .collect();
        let mut byte_token = [0u32; 256];
        for (b, c) in b2u.iter().enumerate() {
            byte_token[b] = vocab.get(&c.to_string()).copied().unwrap_or(0);
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else { continue };
            let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) else { continue };
            let Some(&merged) = vocab.get(&format!("{a}{b}")) else { continue };
            merge_map.entry((ia, ib)).or_insert((rank as u32, merged));
        }
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| is_special[*i] && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let stages = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| TokenizerError::Regex(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        for name in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"] {
            if let Some(&i) = vocab.get(name) {
                if !eos_set.contains(&i) {
                    eos_set.push(i);
                }
            }
        }
        Ok(Tokenizer {
            tokens,
            token_bytes,
            is_control,
            vocab,
            merges: merge_map,
            byte_token,
            specials,
            stages,
            bos,
            eos,
            eos_set,
            add_bos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.vocab.get(s).copied()
    }

    pub fn is_eos(&self, t: u32) -> bool {
        self.eos_set.contains(&t)
    }

    /// Encodes a prompt: the BOS token when the model wants one, then `encode_text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        if self.add_bos {
            out.extend(self.bos);
        }
        self.encode_into(text, &mut out);
        out
    }

    /// Encodes text as it stands, without a BOS token (e.g. to count the tokens of a
    /// completion); special-token strings in it (e.g. `<|im_start|>`) become their ids.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out);
        out
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let mut rest = text;
        'outer: while !rest.is_empty() {
            // Find the earliest special token occurrence.
            let mut best: Option<(usize, &str, u32)> = None;
            for (s, id) in &self.specials {
                if let Some(p) = rest.find(s.as_str()) {
                    if best.is_none_or(|(bp, bs, _)| p < bp || (p == bp && s.len() > bs.len())) {
                        best = Some((p, s, *id));
                    }
                }
            }
            match best {
                Some((p, s, id)) => {
                    self.encode_plain(&rest[..p], out);
                    out.push(id);
                    rest = &rest[p + s.len()..];
                }
                None => {
                    self.encode_plain(rest, out);
                    break 'outer;
                }
            }
        }
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut pieces = vec![text];
        for re in &self.stages {
            let mut next = Vec::new();
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece).flatten() {
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    next.push(m.as_str());
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        for p in pieces {
            self.bpe(p.as_bytes(), out);
        }
    }

    fn bpe(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = bytes.iter().map(|&b| self.byte_token[b as usize]).collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend(syms);
    }

    /// The raw bytes of a token for output: control tokens produce nothing.
    pub fn token_output_bytes(&self, t: u32) -> &[u8] {
        let i = t as usize;
        if self.is_control.get(i).copied().unwrap_or(true) {
            return &[];
        }
        self.token_bytes.get(i).map_or(&[], |b| b.as_slice())
    }

    /// Decodes ids to text, dropping control tokens; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&t| self.token_output_bytes(t).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn token_str(&self, t: u32) -> &str {
        self.tokens.get(t as usize).map_or("", |s| s.as_str())
    }

    /// A control token (`<|im_end|>` and the like): no text of the answer.
    pub fn is_control(&self, t: u32) -> bool {
        self.is_control.get(t as usize).copied().unwrap_or(false)
    }
}

/// Turns a stream of token byte strings into text without ever splitting a UTF-8
/// character across two outputs.
#[derive(Default, Debug, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // Valid by construction of `valid_up_to`.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// Flushes whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_never_splits_a_character() {
        let mut s = Utf8Stream::default();
        let bytes = "é😀".as_bytes();
        let mut out = String::new();
        for b in bytes {
            let piece = s.push(&[*b]);
            assert!(piece.is_empty() || piece == "é" || piece == "😀");
            out.push_str(&piece);
        }
        out.push_str(&s.finish());
        assert_eq!(out, "é😀");
    }
}
