//! Tool calls (`worker::tools`) and `n > 1` on the real default model: forced calls
//! name a declared function with arguments that fit its schema, streamed as a name and
//! argument deltas; `tool_choice: none` answers in text; every choice of `n` is
//! counted; bad tools and choices are 400s naming their parameter.

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

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "The current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}}, "required": ["zone"]}}}])
}

fn body(extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": weather(),
        "max_tokens": 80, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The SSE data events of a streamed answer, parsed.
fn events(sse: &str) -> Vec<Value> {
    sse.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect()
}

fn check_weather_call(name: &str, arguments: &str) {
    let args: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments:?} does not parse: {e}"));
    match name {
        "get_weather" => {
            assert!(args["city"].is_string() && ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()), "{arguments}");
            assert_eq!(args.as_object().unwrap().len(), 2, "{arguments}");
        }
        "get_time" => assert!(args["zone"].is_string(), "{arguments}"),
        other => panic!("called an undeclared function {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn required_and_named_tool_calls_fit_their_schema_streamed_and_not() {
    let st = serving();
    for choice in [json!("required"), json!({"type": "function", "function": {"name": "get_weather"}})] {
        let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body(json!({"tool_choice": choice})))).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{text}");
        assert!(c["message"]["content"].is_null(), "{text}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{text}");
        for call in calls {
            assert!(call["id"].as_str().unwrap().starts_with("call_") && call["type"] == "function", "{text}");
            check_weather_call(call["function"]["name"].as_str().unwrap(), call["function"]["arguments"].as_str().unwrap());
        }
        if choice.is_object() {
            assert!(calls.iter().all(|c| c["function"]["name"] == "get_weather"), "{text}");
        }
    }

    // Streamed: the name once, then the arguments as deltas that add up to the call.
    let (_, sse) = call(&st, "POST", "/v1/chat/completions", Some(body(json!({"tool_choice": "required", "stream": true,
        "parallel_tool_calls": false})))).await;
    let evs = events(&sse);
    let (mut name, mut arguments, mut deltas, mut finish) = (String::new(), String::new(), 0, None);
    for e in &evs {
        let c = &e["choices"][0];
        if let Some(f) = c["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
        for call in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(call["index"], 0, "one call without parallel_tool_calls: {sse}");
            if let Some(n) = call["function"]["name"].as_str() {
                assert!(name.is_empty(), "the name comes once: {sse}");
                name = n.to_owned();
            }
            arguments.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
            deltas += 1;
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"), "{sse}");
    assert!(deltas > 2, "arguments arrive as deltas: {sse}");
    check_weather_call(&name, &arguments);
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_choice_none_and_auto_answer_in_the_right_shape() {
    let st = serving();
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body(json!({"tool_choice": "none", "max_tokens": 12})))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["choices"][0]["message"]["content"].is_string() && v["choices"][0]["message"].get("tool_calls").is_none(), "{text}");
    // `auto`: either text that is not a call, or calls that fit.
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body(json!({})))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let m = &v["choices"][0]["message"];
    match m["tool_calls"].as_array() {
        Some(calls) => calls.iter().for_each(|c| check_weather_call(c["function"]["name"].as_str().unwrap(), c["function"]["arguments"].as_str().unwrap())),
        None => assert!(!m["content"].as_str().unwrap().starts_with("<tool_call>"), "{text}"),
    }
    // A conversation that already called a tool and got its result renders and answers.
    let history = json!([{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]);
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body(json!({"messages": history, "tool_choice": "none", "max_tokens": 8})))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tools_are_400s_naming_their_parameter() {
    let st = serving();
    for (extra, param) in [
        (json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}), "tools"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools"),
        (json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
        (json!({"tools": [], "tool_choice": "required"}), "tool_choice"),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "format": "no-such-format"}}}}}],
            "tool_choice": "required"}), "tools"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
    ] {
        let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body(extra.clone()))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], param, "{extra}: {text}");
    }
    let (status, text) = call(&st, "POST", "/v1/completions", Some(json!({"prompt": "Hi", "tools": weather()}))).await;
    assert_eq!((status, serde_json::from_str::<Value>(&text).unwrap()["error"]["param"].clone()), (StatusCode::BAD_REQUEST, json!("tools")));
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_share_the_prompt_and_are_all_counted() {
    let st = serving();
    let ask = |extra: Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 11});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(ask(json!({})))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2], "{text}");
    let answers: Vec<&str> = choices.iter().map(|c| c["message"]["content"].as_str().unwrap()).collect();
    assert!(answers[0] != answers[1] || answers[1] != answers[2], "each choice samples with its own seed: {answers:?}");
    // Usage: the prompt once, every choice's tokens.
    let alone = call(&st, "POST", "/v1/chat/completions", Some(ask(json!({"n": 1})))).await.1;
    let alone: Value = serde_json::from_str(&alone).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], alone["usage"]["prompt_tokens"]);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 3, "{text}");
    // The first choice of a seeded request is the request with n = 1 (same seed, same prompt cache).
    assert_eq!(answers[0], alone["choices"][0]["message"]["content"].as_str().unwrap());
    // The same seed gives the same three answers again.
    let again: Value = serde_json::from_str(&call(&st, "POST", "/v1/chat/completions", Some(ask(json!({})))).await.1).unwrap();
    assert_eq!(again["choices"], v["choices"]);

    // Streamed: every index gets a role, deltas and a finish reason; usage sums them.
    let (_, sse) = call(&st, "POST", "/v1/chat/completions", Some(ask(json!({"stream": true, "stream_options": {"include_usage": true}})))).await;
    let evs = events(&sse);
    let mut texts = [String::new(), String::new(), String::new()];
    let mut finished = 0;
    for e in &evs {
        for c in e["choices"].as_array().into_iter().flatten() {
            let i = c["index"].as_u64().unwrap() as usize;
            texts[i].push_str(c["delta"]["content"].as_str().unwrap_or_default());
            finished += usize::from(c["finish_reason"].is_string());
        }
    }
    assert_eq!(finished, 3, "{sse}");
    assert_eq!(texts.iter().map(String::as_str).collect::<Vec<_>>(), answers, "streamed and whole answers agree");
    let usage = &evs.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"], "{sse}");
}
