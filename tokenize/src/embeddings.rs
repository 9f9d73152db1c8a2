//! What an OpenAI embeddings request's `input` may be, and the token sequences it
//! becomes for a WordPiece encoder. The worker encodes these sequences; the gateway
//! counts them to hold and bill the request before a provider sees it, so both read
//! `input` with the same rules:
//!
//! - a string, up to `MAX_INPUTS` strings, an array of token ids, or up to
//!   `MAX_INPUTS` arrays of token ids (a text's WordPiece ids, without `[CLS]` and
//!   `[SEP]`, which are added as for text);
//! - no empty string, no empty array, no token id outside the vocabulary;
//! - an input longer than the model's context (with `[CLS]` and `[SEP]`) is refused
//!   unless the request says `truncate: true`, which keeps its first tokens;
//! - at most `MAX_REQUEST_TOKENS` tokens in all.
//!
//! Every refusal names the parameter (`input`), as OpenAI's 400s do.

use serde_json::Value;

use crate::wordpiece::WordPiece;

/// Inputs one request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Tokens one request may carry over all its inputs (OpenAI's limit).
pub const MAX_REQUEST_TOKENS: usize = 300_000;

/// Why an embeddings request is refused: the message and the parameter it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub param: &'static str,
}

fn refuse(message: impl Into<String>, param: &'static str) -> Refusal {
    Refusal { message: message.into(), param }
}

/// A request's inputs, checked for shape but not yet tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inputs<'a> {
    Texts(Vec<&'a str>),
    Tokens(Vec<Vec<u64>>),
}

impl<'a> Inputs<'a> {
    /// Reads `input` (absent is a refusal too).
    pub fn parse(input: Option<&'a Value>) -> Result<Inputs<'a>, Refusal> {
        let input = input.ok_or_else(|| refuse("`input` is required", "input"))?;
        let inputs = match input {
            Value::String(s) => Inputs::Texts(vec![s.as_str()]),
            Value::Array(items) if items.is_empty() => return Err(refuse("`input` must not be an empty array", "input")),
            Value::Array(items) if items.len() > MAX_INPUTS => {
                return Err(refuse(format!("`input` may hold at most {MAX_INPUTS} items; it has {}", items.len()), "input"))
            }
            Value::Array(items) if items.iter().all(Value::is_string) => {
                Inputs::Texts(items.iter().map(|s| s.as_str().unwrap_or_default()).collect())
            }
            Value::Array(items) if items.iter().all(Value::is_number) => Inputs::Tokens(vec![ids(items)?]),
            Value::Array(items) if items.iter().all(Value::is_array) => Inputs::Tokens(
                items
                    .iter()
                    .map(|a| match a.as_array() {
                        Some(a) if !a.is_empty() => ids(a),
                        _ => Err(refuse("an array of token ids must not be empty", "input")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => {
                return Err(refuse(
                    "`input` must be a string, an array of strings, an array of token ids or an array of such arrays",
                    "input",
                ))
            }
        };
        if let Inputs::Texts(texts) = &inputs {
            if texts.iter().any(|t| t.is_empty()) {
                return Err(refuse("`input` must not contain empty strings", "input"));
            }
        }
        Ok(inputs)
    }

    pub fn len(&self) -> usize {
        match self {
            Inputs::Texts(t) => t.len(),
            Inputs::Tokens(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each input's token sequence as the encoder takes it (`[CLS]` … `[SEP]`), for a
    /// model with `wp`'s vocabulary and a context of `max_positions` tokens.
    pub fn sequences(&self, wp: &WordPiece, max_positions: usize, truncate: bool) -> Result<Vec<Vec<u32>>, Refusal> {
        let vocab = wp.vocab_size();
        let texts: Vec<Vec<u32>> = match self {
            Inputs::Texts(texts) => texts.iter().map(|t| wp.encode_text(t)).collect(),
            Inputs::Tokens(lists) => lists
                .iter()
                .map(|list| {
                    list.iter()
                        .map(|&id| match u32::try_from(id) {
                            Ok(id) if (id as usize) < vocab => Ok(id),
                            _ => Err(refuse(format!("token id {id} is outside this model's vocabulary (0 to {})", vocab - 1), "input")),
                        })
                        .collect()
                })
                .collect::<Result<_, _>>()?,
        };
        let max_text = max_positions.saturating_sub(2);
        let mut out = Vec::with_capacity(texts.len());
        let mut total = 0usize;
        for (i, mut t) in texts.into_iter().enumerate() {
            if t.len() > max_text {
                if !truncate {
                    return Err(refuse(
                        format!(
                            "input {i} has {} tokens, more than this model's context of {max_positions} (with [CLS] and [SEP]); shorten it or send `truncate: true`",
                            t.len() + 2
                        ),
                        "input",
                    ));
                }
                t.truncate(max_text);
            }
            total += t.len() + 2;
            out.push(wp.sequence(t));
        }
        if total > MAX_REQUEST_TOKENS {
            return Err(refuse(format!("the inputs hold {total} tokens; a request may hold at most {MAX_REQUEST_TOKENS}"), "input"));
        }
        Ok(out)
    }

    /// The most tokens these inputs can be for any WordPiece model: a text gives at
    /// most one piece per character, and each sequence adds `[CLS]` and `[SEP]`.
    pub fn most_tokens(&self) -> u64 {
        let each = |n: usize| n as u64 + 2;
        match self {
            Inputs::Texts(texts) => texts.iter().map(|t| each(t.chars().count())).sum(),
            Inputs::Tokens(lists) => lists.iter().map(|l| each(l.len())).sum(),
        }
    }
}

fn ids(items: &[Value]) -> Result<Vec<u64>, Refusal> {
    items
        .iter()
        .map(|v| v.as_u64().ok_or_else(|| refuse(format!("token id {v} is not a non-negative integer"), "input")))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn wordpiece() -> WordPiece {
        let vocab: serde_json::Map<String, Value> =
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s", "!"].iter().enumerate().map(|(i, t)| ((*t).to_owned(), json!(i))).collect();
        WordPiece::from_hf_json(&json!({
            "normalizer": {"type": "BertNormalizer", "lowercase": true, "clean_text": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": vocab},
        }))
        .unwrap()
    }

    #[test]
    fn every_input_form_becomes_sequences() {
        let wp = wordpiece();
        let one = json!("Hello worlds!");
        let seqs = Inputs::parse(Some(&one)).unwrap().sequences(&wp, 512, false).unwrap();
        assert_eq!(seqs, [vec![2, 4, 5, 6, 7, 3]]);
        let many = json!(["hello", "world"]);
        assert_eq!(Inputs::parse(Some(&many)).unwrap().sequences(&wp, 512, false).unwrap(), [vec![2, 4, 3], vec![2, 5, 3]]);
        let ids = json!([4, 5]);
        assert_eq!(Inputs::parse(Some(&ids)).unwrap().sequences(&wp, 512, false).unwrap(), [vec![2, 4, 5, 3]]);
        let lists = json!([[4], [5, 5]]);
        let parsed = Inputs::parse(Some(&lists)).unwrap();
        assert_eq!((parsed.len(), parsed.most_tokens()), (2, 3 + 4));
        assert_eq!(Inputs::parse(Some(&one)).unwrap().most_tokens(), 13 + 2, "a piece per character at most");
    }

    #[test]
    fn refusals_name_input() {
        let wp = wordpiece();
        let refused = |v: Option<Value>| Inputs::parse(v.as_ref()).and_then(|i| i.sequences(&wp, 4, false)).unwrap_err();
        for (value, says) in [
            (None, "required"),
            (Some(json!([])), "empty array"),
            (Some(json!(["a", ""])), "empty strings"),
            (Some(json!([[]])), "must not be empty"),
            (Some(json!([1, -2])), "non-negative"),
            (Some(json!([99])), "outside this model's vocabulary"),
            (Some(json!({"a": 1})), "must be a string"),
            (Some(json!(["hello", 4])), "must be a string"),
            (Some(json!("hello world hello")), "more than this model's context of 4"),
            (Some(Value::Array(vec![json!("a"); MAX_INPUTS + 1])), "at most 2048"),
        ] {
            let r = refused(value);
            assert_eq!(r.param, "input");
            assert!(r.message.contains(says), "{}", r.message);
        }
        let long = json!("hello world hello");
        let cut = Inputs::parse(Some(&long)).unwrap().sequences(&wp, 4, true).unwrap();
        assert_eq!(cut, [vec![2, 4, 5, 3]], "truncate keeps the first tokens");
        let many = Value::Array(vec![json!(vec![4; 200]); 1600]);
        let r = Inputs::parse(Some(&many)).unwrap().sequences(&wp, 512, false).unwrap_err();
        assert!(r.message.contains("at most 300000"), "{}", r.message);
    }
}
