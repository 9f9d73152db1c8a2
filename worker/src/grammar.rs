//! Structured outputs by constrained decoding: `response_format` `json_object` or
//! `json_schema` becomes an llguidance grammar, and at every step the sampler may only
//! pick tokens that keep the output a valid prefix of it (`Matcher::compute_mask`);
//! once the grammar is complete only the end of the sequence is allowed, so a finished
//! answer always parses. A schema keyword llguidance cannot enforce is a 400 naming
//! `response_format` (llguidance refuses it when the grammar is built). When
//! `max_tokens` cuts an answer first, it ends with `finish_reason: length` and the
//! partial text as it is.
//!
//! The JSON is written compactly with a space after `,` and `:` (no free whitespace: a
//! small model given free whitespace can fill `max_tokens` with newlines), and an
//! `integer` without bounds gets JSON's interoperable range, ±(2^53 − 1) (a small model
//! can otherwise repeat a digit until `max_tokens`).
//!
//! The token trie is built once per model from the tokenizer's bytes per token
//! (control tokens marked as llguidance expects, so grammars never produce them).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use tokenize::Tokenizer;
use toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};

/// Builds grammars for one model's tokenizer.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// The token trie of `tokenizer` (about 0.2 s for a 49,152-token vocabulary).
    pub fn new(tokenizer: &Tokenizer) -> Result<Grammars, String> {
        let n = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|t| {
                if tokenizer.is_control(t) {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(tokenizer.token_str(t).as_bytes());
                    w
                } else {
                    tokenizer.token_output_bytes(t).to_vec()
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(n as u32, tokenizer.eos), &words);
        let env: toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        Ok(Grammars { factory })
    }

    /// The constraint a chat request's `response_format` asks for: `None` for text (or
    /// none), else a fresh matcher, or why the format cannot be served.
    pub fn constraint(&self, response_format: Option<&Value>) -> Result<Option<Matcher>, String> {
        Grammars::schema(response_format)?.map(|s| self.matcher(s)).transpose()
    }

    /// The JSON schema `response_format` asks answers to follow, if any (with its
    /// integers bounded as this module says), or why it cannot be served.
    pub fn schema(response_format: Option<&Value>) -> Result<Option<Value>, String> {
        let Some(rf) = response_format else { return Ok(None) };
        let mut schema = match rf.get("type").and_then(Value::as_str) {
            None | Some("text") => return Ok(None),
            Some("json_object") => json!({"type": "object"}),
            Some("json_schema") => match rf.get("json_schema").and_then(|s| s.get("schema")) {
                Some(Value::Object(schema)) => Value::Object(schema.clone()),
                // OpenAI allows a json_schema without a schema: any JSON value.
                None => json!({}),
                Some(_) => return Err("response_format.json_schema.schema must be a JSON object".into()),
            },
            Some(other) => return Err(format!("response_format type `{other}` is not supported (text, json_object, json_schema)")),
        };
        bound_integers(&mut schema);
        Ok(Some(schema))
    }

    /// The constraint of a request with `tools` (`tools::Tools::lark`); `text` is the
    /// schema of `response_format`, if any. `None` when the output is free.
    pub fn tool_constraint(&self, tools: &crate::tools::Tools, text: Option<&Value>) -> Result<Option<Matcher>, String> {
        let mut tools = tools.clone();
        tools.tools.iter_mut().for_each(|t| bound_integers(&mut t.parameters));
        let Some(lark) = tools.lark(text, &json_options()) else { return Ok(None) };
        self.compile(TopLevelGrammar::from_lark(lark)).map(Some)
    }

    fn matcher(&self, mut schema: Value) -> Result<Matcher, String> {
        if let Some(o) = schema.as_object_mut() {
            o.insert("x-guidance".into(), json_options());
        }
        self.compile(TopLevelGrammar::from_json_schema(schema))
    }

    fn compile(&self, grammar: TopLevelGrammar) -> Result<Matcher, String> {
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(matcher),
        }
    }
}

/// How every JSON part is written: compact, one space after `,` and `:`.
fn json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// JSON's interoperable integers (RFC 8259 §6): ±(2^53 − 1).
const SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Gives every `integer` without a bound of its own the interoperable range, so an
/// integer has at most 16 digits: a small model sampling greedily can otherwise
/// repeat a digit until `max_tokens`, and clients beyond JavaScript's safe range lose
/// precision anyway.
fn bound_integers(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            let integer = match o.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                if !o.contains_key("minimum") && !o.contains_key("exclusiveMinimum") {
                    o.insert("minimum".into(), json!(-SAFE_INTEGER));
                }
                if !o.contains_key("maximum") && !o.contains_key("exclusiveMaximum") {
                    o.insert("maximum".into(), json!(SAFE_INTEGER));
                }
            }
            o.values_mut().for_each(bound_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

/// Masks `logits` to the tokens `m` allows next (only the end of the sequence once the
/// grammar is complete). Ids the grammar's vocabulary lacks (padding rows of the
/// output matrix) are masked too.
pub fn mask(m: &mut Matcher, logits: &mut [f32]) -> Result<(), String> {
    let allowed = m.compute_mask_or_eos().map_err(|e| e.to_string())?;
    let n = allowed.len();
    for (id, l) in logits.iter_mut().enumerate() {
        if id >= n || !allowed.is_allowed(id as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
    Ok(())
}
