//! WordPiece, the tokenizer of BERT-family encoders (all-MiniLM-L6-v2 and other
//! sentence-embedding models), from a Hugging Face `tokenizer.json` whose `model` is
//! `WordPiece`. What the file says is what runs, as Hugging Face `tokenizers` does it:
//!
//! 1. BERT's normalizer: control characters dropped and whitespace made spaces
//!    (`clean_text`), spaces around CJK ideographs (`handle_chinese_chars`), accents
//!    stripped after NFD (`strip_accents`, which follows `lowercase` when null), then
//!    lowercase.
//! 2. BERT's pre-tokenizer: split on whitespace, and every punctuation character on its
//!    own.
//! 3. Each word greedily, longest match first; pieces after the first carry the
//!    `continuing_subword_prefix` (`##`). A word with a piece not in the vocabulary, or
//!    longer than `max_input_chars_per_word`, is one `unk_token`.
//! 4. `[CLS] … [SEP]` around the sequence (`encode`), as the model was trained.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use unicode_categories::UnicodeCategories;
use unicode_normalization::UnicodeNormalization;

use crate::tokenizer::TokenizerError;

pub struct WordPiece {
    vocab: HashMap<String, u32>,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub pad: Option<u32>,
    prefix: String,
    max_word_chars: usize,
    clean_text: bool,
    chinese_chars: bool,
    strip_accents: bool,
    lowercase: bool,
}

impl WordPiece {
    /// Reads `tokenizer.json` at `path`.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let shown = || path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: shown(), source })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| TokenizerError::Json { path: shown(), message: e.to_string() })?;
        Self::from_hf_json(&json)
    }

    /// Builds it from a parsed `tokenizer.json`.
    pub fn from_hf_json(json: &Value) -> Result<Self, TokenizerError> {
        let model = &json["model"];
        if model["type"].as_str() != Some("WordPiece") {
            return Err(TokenizerError::NotWordPiece(model["type"].as_str().unwrap_or("none").to_owned()));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or(TokenizerError::Missing("model.vocab"))?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
            .collect();
        let id = |name: &str| vocab.get(name).copied();
        let unk_name = model["unk_token"].as_str().unwrap_or("[UNK]");
        let unk = id(unk_name).ok_or(TokenizerError::Missing("the unk_token in the vocabulary"))?;
        // The post-processor names the sequence's first and last tokens (a template's
        // first and last special token, or BertProcessing's `cls` and `sep`); BERT's
        // names are the fallback.
        let post = &json["post_processor"];
        let template: Vec<&str> = post["single"]
            .as_array()
            .map(|s| s.iter().filter_map(|p| p["SpecialToken"]["id"].as_str()).collect())
            .unwrap_or_default();
        let special = |which: &str, fallback: &str| {
            let named = post[which][0].as_str().or(if which == "cls" { template.first() } else { template.last() }.copied());
            named.and_then(id).or_else(|| id(fallback))
        };
        let cls = special("cls", "[CLS]").ok_or(TokenizerError::Missing("[CLS] in the vocabulary"))?;
        let sep = special("sep", "[SEP]").ok_or(TokenizerError::Missing("[SEP] in the vocabulary"))?;
        let normalizer = &json["normalizer"];
        let lowercase = normalizer["lowercase"].as_bool().unwrap_or(false);
        Ok(Self {
            pad: id(json["padding"]["pad_token"].as_str().unwrap_or("[PAD]")),
            prefix: model["continuing_subword_prefix"].as_str().unwrap_or("##").to_owned(),
            max_word_chars: model["max_input_chars_per_word"].as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(100),
            clean_text: normalizer["clean_text"].as_bool().unwrap_or(false),
            chinese_chars: normalizer["handle_chinese_chars"].as_bool().unwrap_or(false),
            strip_accents: normalizer["strip_accents"].as_bool().unwrap_or(lowercase),
            lowercase,
            vocab,
            unk,
            cls,
            sep,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// `[CLS]`, the text's tokens, `[SEP]`: what the encoder takes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.sequence(self.encode_text(text))
    }

    /// A text's tokens as the encoder takes them: `[CLS]` before, `[SEP]` after.
    pub fn sequence(&self, text_ids: Vec<u32>) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text_ids.len() + 2);
        ids.push(self.cls);
        ids.extend(text_ids);
        ids.push(self.sep);
        ids
    }

    /// The text's tokens without the sequence's special tokens.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let mut ids = Vec::new();
        for word in pre_tokenize(&normalized) {
            self.word_pieces(word, &mut ids);
        }
        ids
    }

    fn normalize(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if self.clean_text {
                if c == '\0' || c == '\u{fffd}' || is_control(c) {
                    continue;
                }
                if is_whitespace(c) {
                    out.push(' ');
                    continue;
                }
            }
            if self.chinese_chars && is_chinese_char(c) {
                out.push(' ');
                out.push(c);
                out.push(' ');
            } else {
                out.push(c);
            }
        }
        if self.strip_accents {
            out = out.nfd().filter(|c| !c.is_mark_nonspacing()).collect();
        }
        if self.lowercase {
            out = out.to_lowercase();
        }
        out
    }

    fn word_pieces(&self, word: &str, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_word_chars {
            ids.push(self.unk);
            return;
        }
        let first = ids.len();
        let mut start = 0;
        let mut piece = String::new();
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                piece.clear();
                if start > 0 {
                    piece.push_str(&self.prefix);
                }
                piece.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(&piece) {
                    found = Some(id);
                    break;
                }
                // One character shorter.
                end = word[..end].char_indices().next_back().map_or(start, |(i, _)| i);
            }
            let Some(id) = found else {
                ids.truncate(first);
                ids.push(self.unk);
                return;
            };
            ids.push(id);
            start = end;
        }
    }
}

/// BERT's pre-tokenizer: words split on whitespace, each punctuation character alone.
fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() || is_punctuation(c) {
            if let Some(s) = start.take() {
                words.push(&text[s..i]);
            }
            if !c.is_whitespace() {
                words.push(&text[i..i + c.len_utf8()]);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        words.push(&text[s..]);
    }
    words
}

fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.is_other()
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.is_punctuation()
}

/// The CJK ideograph blocks BERT surrounds with spaces.
fn is_chinese_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BERT-style `tokenizer.json` with a small vocabulary, in the shape
    /// sentence-transformers ships (uncased: lowercase, accents stripped).
    fn fixture() -> WordPiece {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "un", "##aff", "##able", ",", "!", "a", "##b", "caf",
            "##e", "中", "x",
        ];
        let vocab: serde_json::Map<String, Value> =
            words.iter().enumerate().map(|(i, w)| ((*w).to_owned(), Value::from(i as u64))).collect();
        let json = serde_json::json!({
            "normalizer": { "type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true },
            "pre_tokenizer": { "type": "BertPreTokenizer" },
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{ "SpecialToken": { "id": "[CLS]", "type_id": 0 } }, { "Sequence": { "id": "A", "type_id": 0 } }, { "SpecialToken": { "id": "[SEP]", "type_id": 0 } }],
                "special_tokens": { "[CLS]": { "id": "[CLS]", "ids": [2], "tokens": ["[CLS]"] }, "[SEP]": { "id": "[SEP]", "ids": [3], "tokens": ["[SEP]"] } }
            },
            "model": { "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": vocab }
        });
        WordPiece::from_hf_json(&json).unwrap()
    }

    #[test]
    fn normalizes_splits_and_finds_the_longest_pieces() {
        let t = fixture();
        assert_eq!((t.cls, t.sep, t.unk, t.pad), (2, 3, 1, Some(0)));
        // "Café" loses its accent and case; "中" stands alone; "文" is not in the
        // vocabulary; the control character disappears; the tab is a space.
        let ids = t.encode("Hello,\tworlds!\u{7} unaffable Café 中文");
        // [CLS] hello , world ##s ! un ##aff ##able caf ##e 中 [UNK] [SEP]
        assert_eq!(ids, vec![2, 4, 10, 5, 6, 11, 7, 8, 9, 14, 15, 16, 1, 3]);
    }

    #[test]
    fn a_word_with_an_unknown_piece_is_one_unk() {
        let t = fixture();
        // "ab" = a ##b; "abz" has no "##z": the whole word is [UNK], not "a ##b [UNK]".
        assert_eq!(t.encode_text("ab abz x"), vec![12, 13, 1, 17]);
        assert_eq!(t.encode_text(&"x".repeat(101)), vec![1], "over max_input_chars_per_word");
        assert_eq!(t.encode_text(""), Vec::<u32>::new());
        assert_eq!(t.encode(""), vec![2, 3]);
    }

    #[test]
    fn a_bpe_file_is_refused() {
        let json = serde_json::json!({ "model": { "type": "BPE", "vocab": {}, "merges": [] } });
        assert!(matches!(WordPiece::from_hf_json(&json), Err(TokenizerError::NotWordPiece(m)) if m == "BPE"));
    }
}
