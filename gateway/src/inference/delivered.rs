//! What a provider delivered, as the gateway counts it, and whether the provider's
//! usage report is plausible against that count.
//!
//! With the model's tokenizer (config `tokenizers`) the count is the number of tokens
//! of the delivered completion: each choice's text is kept as it streams and encoded
//! once, when the count is first needed (the usage chunk or the end), because token
//! boundaries cross chunks. Without a tokenizer the count is the number of content
//! chunks, a weak lower bound (a chunk carries at least one token).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use openapi::stream::{ChunkChoice, StreamChunk};
use tokenize::Tokenizer;

/// Tokens an honest provider's count of a choice may differ from ours by: it counts
/// the end-of-sequence token it generated, the tokens of a stop sequence cut from the
/// text, and a character split by a length cut; its tokenization of special text can
/// differ too.
pub const SLACK_PER_CHOICE: u32 = 4;
/// Tokens of call syntax a model writes around a tool call's name and arguments
/// (`<tool_call>`, `{"name": …, "arguments": …}`), which the delivered deltas lack.
pub const SLACK_PER_TOOL_CALL: u32 = 24;
/// Sampling may pick a split of the text other than the tokenizer's own (`**` `**` for
/// `****`), so the counts may also differ by this share of the text's tokens. Measured
/// on the default model (SmolLM2-135M, 104 answers of up to 300 tokens): greedy answers
/// differ by the end-of-sequence token (1-2), sampled ones (temperature 1 to 1.5, prose
/// and code) by up to 7% more and 4% fewer tokens than the tokenizer's count; 10% leaves
/// a margin while still catching any larger over-report.
pub const SLACK_PERCENT: u32 = 10;

/// Whether a choice carries output (text, a refusal, a tool call).
pub fn carries_token(choice: &ChunkChoice) -> bool {
    choice.text.as_deref().is_some_and(|t| !t.is_empty())
        || choice.delta.as_ref().is_some_and(|d| {
            d.content.as_deref().is_some_and(|c| !c.is_empty())
                || d.refusal.as_deref().is_some_and(|c| !c.is_empty())
                || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
        })
}

pub struct Delivered {
    tokenizer: Option<Arc<Tokenizer>>,
    /// Choices that carried output, over all chunks.
    chunks: u32,
    /// Each choice's delivered text (kept only with a tokenizer), and each tool call's
    /// name and arguments by (choice, call index), apart: call syntax separates them.
    text: BTreeMap<u32, String>,
    tool_calls: BTreeMap<(u32, u32), String>,
    /// The token count of the text so far, computed once; reset when more arrives.
    tokens: OnceLock<u32>,
}

impl Delivered {
    pub fn new(tokenizer: Option<Arc<Tokenizer>>) -> Self {
        Self { tokenizer, chunks: 0, text: BTreeMap::new(), tool_calls: BTreeMap::new(), tokens: OnceLock::new() }
    }

    /// Choice deltas that carried output so far: a lower bound of the tokens delivered
    /// (each carries at least one), cheap to read after every chunk.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Whether completions are counted with the model's tokenizer.
    pub fn by_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// Takes in one chunk; returns how many of its choices carried output.
    pub fn observe(&mut self, chunk: &StreamChunk) -> u32 {
        let mut carried = 0;
        for choice in chunk.choices.iter().filter(|c| carries_token(c)) {
            carried += 1;
            if self.tokenizer.is_some() {
                self.keep(choice);
            }
        }
        self.chunks = self.chunks.saturating_add(carried);
        carried
    }

    fn keep(&mut self, choice: &ChunkChoice) {
        self.tokens = OnceLock::new();
        let text = self.text.entry(choice.index).or_default();
        text.push_str(choice.text.as_deref().unwrap_or_default());
        let Some(delta) = &choice.delta else { return };
        for part in [&delta.content, &delta.refusal].into_iter().flatten() {
            text.push_str(part);
        }
        for call in delta.tool_calls.iter().flatten() {
            let text = self.tool_calls.entry((choice.index, call.index)).or_default();
            for part in call.function.iter().flat_map(|f| [&f.name, &f.arguments]).flatten() {
                text.push_str(part);
            }
        }
    }

    /// The completion tokens the gateway counts: tokenizer tokens of the delivered
    /// text, or content chunks without a tokenizer.
    pub fn count(&self) -> u32 {
        let Some(tokenizer) = &self.tokenizer else { return self.chunks };
        *self.tokens.get_or_init(|| {
            let tokens: usize =
                self.text.values().chain(self.tool_calls.values()).map(|t| tokenizer.encode_text(t).len()).sum();
            u32::try_from(tokens).unwrap_or(u32::MAX)
        })
    }

    /// Whether `reported` completion tokens can describe what was delivered. With a
    /// tokenizer: within `SLACK_PER_CHOICE` per choice, `SLACK_PER_TOOL_CALL` per tool
    /// call and `SLACK_PERCENT` of the count, either way. Without one: at least one
    /// token per content chunk and at most 4 per chunk + 16, a loose bound.
    pub fn plausible(&self, reported: u32) -> bool {
        let counted = self.count();
        if !self.by_tokenizer() {
            return reported >= counted && reported <= counted.saturating_mul(4).saturating_add(16);
        }
        let as_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let slack = SLACK_PER_CHOICE
            .saturating_mul(as_u32(self.text.len()).max(1))
            .saturating_add(SLACK_PER_TOOL_CALL.saturating_mul(as_u32(self.tool_calls.len())))
            .saturating_add(counted.saturating_mul(SLACK_PERCENT) / 100);
        reported.abs_diff(counted) <= slack
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Letters, `.` and the byte-level space `Ġ` as single tokens, and merges that make
    /// `Paris` and `ĠParis` one token each.
    fn tokenizer() -> Arc<Tokenizer> {
        let mut tokens: Vec<String> = ('a'..='z').chain('A'..='Z').map(String::from).collect();
        tokens.extend(["Ġ", ".", "Pa", "Par", "Pari", "Paris", "ĠParis"].map(String::from));
        let merges = ["P a", "Pa r", "Par i", "Pari s", "Ġ Paris"].map(String::from);
        let types = vec![1; tokens.len()];
        let patterns = tokenize::tokenizer::patterns_for("default");
        let eos = u32::try_from(tokens.len() - 1).unwrap();
        Arc::new(Tokenizer::new(tokens, &merges, &types, &patterns, None, eos, vec![eos], false).unwrap())
    }

    fn chunk(choices: serde_json::Value) -> StreamChunk {
        serde_json::from_value(json!({ "choices": choices })).unwrap()
    }

    fn content(index: u32, text: &str) -> StreamChunk {
        chunk(json!([{ "index": index, "delta": { "content": text } }]))
    }

    #[test]
    fn tokens_are_counted_across_chunk_boundaries() {
        let mut d = Delivered::new(Some(tokenizer()));
        for piece in ["Pa", "ris", " is", " Paris", "."] {
            assert_eq!(d.observe(&content(0, piece)), 1);
        }
        // Paris | Ġ i s | ĠParis | . — not one token per chunk, nor per chunk's own encoding.
        assert_eq!(d.count(), 6);
        // A count is cached until more text arrives.
        d.observe(&content(0, "is"));
        assert_eq!(d.count(), 8);
        // Role-only and finish chunks carry nothing.
        assert_eq!(d.observe(&chunk(json!([{ "index": 0, "delta": { "role": "assistant" }, "finish_reason": "stop" }]))), 0);
        assert_eq!(d.count(), 8);
    }

    #[test]
    fn without_a_tokenizer_content_chunks_are_counted() {
        let mut d = Delivered::new(None);
        for piece in ["Pa", "ris", " is", " Paris", "."] {
            d.observe(&content(0, piece));
        }
        assert_eq!(d.count(), 5);
        let plausible: Vec<u32> = (0..50).filter(|r| d.plausible(*r)).collect();
        assert_eq!((plausible.first(), plausible.last()), (Some(&5), Some(&36)), "1 to 4 tokens a chunk, + 16");
    }

    /// The range of reports `d` accepts.
    fn accepted(d: &Delivered) -> (u32, u32) {
        let ok: Vec<u32> = (0..1000).filter(|r| d.plausible(*r)).collect();
        (ok[0], ok[ok.len() - 1])
    }

    #[test]
    fn the_tolerance_grows_with_choices_tool_calls_and_length() {
        let mut d = Delivered::new(Some(tokenizer()));
        d.observe(&content(0, "Paris"));
        assert_eq!(d.count(), 1);
        assert_eq!(accepted(&d), (0, 5), "4 tokens either way for one choice");
        d.observe(&content(1, "Paris"));
        assert_eq!(d.count(), 2);
        assert_eq!(accepted(&d), (0, 10), "4 per choice");
        let call = json!([{ "index": 0, "delta": { "tool_calls": [
            { "index": 0, "id": "call_1", "type": "function", "function": { "name": "Paris", "arguments": "" } }
        ] } }]);
        d.observe(&chunk(call));
        d.observe(&chunk(json!([{ "index": 0, "delta": { "tool_calls": [{ "index": 0, "function": { "arguments": "ab" } }] } }])));
        assert_eq!(d.count(), 5, "two choices' Paris, and the call's name and arguments: Paris a b");
        assert_eq!(accepted(&d), (0, 5 + 8 + 24), "24 per tool call");
        let mut long = Delivered::new(Some(tokenizer()));
        long.observe(&content(0, &"a".repeat(200)));
        assert_eq!(long.count(), 200);
        assert_eq!(accepted(&long), (200 - 24, 200 + 24), "4 + 10% of 200");
    }
}
