//! The OpenAI API in-process through `app()`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;
use worker::engine::{Engine, EngineConfig};
use worker::quant::Precision;
use worker::server::{app, AppState};

use crate::{call, model};

fn state() -> AppState {
    let m = model();
    let id = m.default_model_id();
    AppState::new(Engine::start(m, EngineConfig::default()), id)
}

fn capital_question(extra: Value) -> Value {
    let mut body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn streams_chat_with_usage_chunk_and_done() {
    let st = state();
    let body = capital_question(json!({"stream": true, "stream_options": {"include_usage": true}, "user": "u-123", "priority": 3}));
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(content, "The capital of France is Paris.");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 45);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    assert!(chunks.iter().all(|c| c["model"] == "smollm2-135m-instruct" && c["object"] == "chat.completion.chunk"));
}

#[tokio::test]
async fn answers_without_stream_and_legacy_completions() {
    let st = state();
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(capital_question(json!({})))).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 37);

    let body = json!({"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0});
    let (status, text) = call(&st, "POST", "/v1/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn errors_are_openai_shaped() {
    let st = state();
    let long = "hello ".repeat(9000);
    let cases = [
        (json!({"messages": [{"role": "user", "content": long}]}), StatusCode::BAD_REQUEST, "context_length_exceeded", "8192"),
        (capital_question(json!({"n": 99})), StatusCode::BAD_REQUEST, "", "n must be between 1 and 16"),
        (capital_question(json!({"model": "gpt-4"})), StatusCode::NOT_FOUND, "model_not_found", "gpt-4"),
        (capital_question(json!({"temperature": 3})), StatusCode::BAD_REQUEST, "", "temperature"),
        (json!({"messages": "nope"}), StatusCode::BAD_REQUEST, "", "Invalid request body"),
    ];
    for (body, want_status, want_code, want_text) in cases {
        let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body)).await;
        assert_eq!(status, want_status, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let err = &v["error"];
        assert_eq!(err["type"].as_str().unwrap(), "invalid_request_error");
        assert!(err.get("param").is_some() && err.get("code").is_some(), "{text}");
        if !want_code.is_empty() {
            assert_eq!(err["code"], want_code);
        }
        assert!(err["message"].as_str().unwrap().contains(want_text), "{text}");
    }
}

#[tokio::test]
async fn models_health_and_metrics() {
    let st = state();
    let (_, text) = call(&st, "GET", "/v1/models", None).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["data"][0]["id"], "smollm2-135m-instruct");
    let (status, _) = call(&st, "GET", "/v1/models/smollm2-135m-instruct", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, text) = call(&st, "GET", "/health", None).await;
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["activeStreams"], 0);
    assert_eq!(v["queueLength"], 0);
    assert!(v["memory"]["rssMb"].as_u64().unwrap() > 0);
    let (_, text) = call(&st, "GET", "/metrics", None).await;
    assert!(text.contains("worker_active_streams 0"), "{text}");
}

#[tokio::test]
async fn precision_comes_from_the_body_else_the_configured_default() {
    let m = model();
    let id = m.default_model_id();
    let st = AppState::new(Engine::start(m, EngineConfig { default_precision: Precision::Fast, ..Default::default() }), id);
    for extra in [json!({"precision": "full"}), json!({"precision": "reduced"}), json!({})] {
        let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(capital_question(extra.clone()))).await;
        assert_eq!(status, StatusCode::OK, "{extra}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.", "{extra}");
    }
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(capital_question(json!({"precision": "half"})))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["param"], "precision");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // The request without `precision` ran at the default (reduced); the refused one is not counted.
    let (_, text) = call(&st, "GET", "/metrics", None).await;
    assert!(text.contains("worker_requests_by_precision_total{precision=\"full\"} 1\n"), "{text}");
    assert!(text.contains("worker_requests_by_precision_total{precision=\"reduced\"} 2\n"), "{text}");
}

#[tokio::test]
async fn client_disconnect_cancels_the_request() {
    let st = state();
    let body = json!({"messages": [{"role": "user", "content": "Write a very long story about dragons."}],
        "stream": true, "max_tokens": 2000, "temperature": 0});
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app(st.clone()).oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    // Read a few events, then go away.
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    let stats = st.engine.stats();
    for _ in 0..100 {
        if stats.cancelled_total.load(Relaxed) == 1 && stats.active.load(Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.cancelled_total.load(Relaxed), 1);
    assert_eq!(stats.active.load(Relaxed), 0);
    assert!(stats.completion_tokens_total.load(Relaxed) < 200);
}

#[tokio::test]
async fn reports_logprobs_stream_and_not() {
    let st = state();
    let body = capital_question(json!({"logprobs": true, "top_logprobs": 2}));
    let (status, text) = call(&st, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let entries = v["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    let tokens: String = entries.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(tokens, "The capital of France is Paris.");
    for e in &entries {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(e["top_logprobs"][0]["token"], e["token"]);
        assert!((e["top_logprobs"][0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
    }

    let body = capital_question(json!({"logprobs": true, "stream": true}));
    let (_, text) = call(&st, "POST", "/v1/chat/completions", Some(body)).await;
    let streamed: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .flat_map(|d| {
            let c: Value = serde_json::from_str(d).unwrap();
            c["choices"][0]["logprobs"]["content"].as_array().cloned().unwrap_or_default()
        })
        .collect();
    assert_eq!(streamed.len(), entries.len(), "one entry per generated token");
    for (a, b) in streamed.iter().zip(&entries) {
        assert_eq!(a["token"], b["token"]);
        assert_eq!(a["logprob"], b["logprob"]);
    }

    let (status, _) = call(&st, "POST", "/v1/chat/completions", Some(capital_question(json!({"top_logprobs": 2})))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
