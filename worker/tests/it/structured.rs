//! Structured outputs on the real default model (`worker::grammar`): every answer to a
//! `json_schema` or `json_object` request parses and fits its schema unless
//! `max_tokens` cut it (then `finish_reason` is `length` and the text is a prefix), and
//! schemas llguidance cannot enforce are a 400 naming `response_format`.

use axum::http::StatusCode;
use serde_json::{json, Value};
use worker::engine::{Engine, EngineConfig};
use worker::server::AppState;

use crate::{call, model};

fn serving() -> AppState {
    let m = model();
    let id = m.default_model_id();
    AppState::new(Engine::start(m, EngineConfig::default()), id)
}

async fn structured(st: &AppState, prompt: &str, format: Value, extra: Value) -> (String, String) {
    let mut body = json!({"messages": [{"role": "user", "content": prompt}], "response_format": format, "max_tokens": 120, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, text) = call(st, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let choice = &v["choices"][0];
    (choice["message"]["content"].as_str().unwrap().to_owned(), choice["finish_reason"].as_str().unwrap().to_owned())
}

fn schema(name: &str, schema: Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": true}})
}

#[tokio::test(flavor = "multi_thread")]
async fn structured_answers_parse_and_fit_their_schema() {
    let st = serving();
    let person = json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"], "additionalProperties": false});
    for (prompt, extra) in [
        ("Alice is 30 years old. Give her as JSON.", json!({})),
        ("Describe a made-up person.", json!({"temperature": 1.0, "seed": 7})),
    ] {
        let (text, finish) = structured(&st, prompt, schema("person", person.clone()), extra).await;
        assert_eq!(finish, "stop", "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
        let o = v.as_object().unwrap();
        assert!(o["name"].is_string() && o["age"].is_i64() && o.len() == 2, "{text}");
    }
    let colour = json!({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]});
    let (text, _) = structured(&st, "What colour is the sky?", schema("colour", colour), json!({})).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(["red", "green", "blue"].contains(&v["colour"].as_str().unwrap()), "{text}");
    let list = json!({"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"n": {"type": "integer"}, "note": {"type": "string", "maxLength": 20}}, "required": ["n"], "additionalProperties": false}}},
        "required": ["items"], "additionalProperties": false});
    let (text, finish) = structured(&st, "List two numbers.", schema("list", list), json!({})).await;
    assert_eq!(finish, "stop", "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let items = v["items"].as_array().unwrap();
    assert!((1..=3).contains(&items.len()) && items.iter().all(|i| i["n"].is_i64()), "{text}");
    let (text, finish) = structured(&st, "Tell me about cats.", json!({"type": "json_object"}), json!({})).await;
    assert_eq!(finish, "stop");
    assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");

    // Streamed, the deltas add up to a parsing answer.
    let body = json!({"messages": [{"role": "user", "content": "Bob is 41."}], "response_format": schema("person", person.clone()),
        "max_tokens": 120, "temperature": 0, "stream": true});
    let (_, sse) = call(&st, "POST", "/v1/chat/completions", Some(body)).await;
    let text: String = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!(serde_json::from_str::<Value>(&text).unwrap()["age"].is_i64(), "{text}");

    // Cut by max_tokens: `length`, the partial text as it is.
    let (text, finish) = structured(&st, "Alice is 30.", schema("person", person), json!({"max_tokens": 3})).await;
    assert_eq!(finish, "length");
    assert!(text.starts_with('{') && serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unenforceable_schemas_and_formats_are_refused_by_name() {
    let st = serving();
    for format in [
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "made-up"}}}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}}),
        json!({"type": "yaml"}),
    ] {
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "response_format": format});
        let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{format}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], "response_format", "{text}");
    }
    let body = json!({"prompt": "hi", "response_format": {"type": "json_object"}});
    let (status, text) = call(&st, "POST", "/v1/completions", Some(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
}
