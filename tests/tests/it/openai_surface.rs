//! The OpenAI surface and the relay: chat and legacy completions (stream or not),
//! errors in OpenAI's shape, failover and cancellation, h2c providers, graceful
//! shutdown, models, registration, keys, the seed's simple API and WebSocket, HTTPS.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use gateway::ops::config::Registration;
use gateway::ops::server::{self, Running};
use gateway::store::Store;
use serde_json::{json, Value};
use tests::{spawn_mock, MockConfig};
use tokio::sync::oneshot;

use crate::inproc::*;

#[tokio::test]
async fn inproc_chat_non_stream() {
    let (gw, mock, key) = setup().await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("What is the capital of France?")})).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    assert_eq!(r.headers()["x-quality-served"], "standard");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn inproc_provider_gets_resolved_params_and_pseudonym() {
    let (gw, mock, key) = setup().await;
    let r = gw
        .chat(&key, json!({"model": "mock-model:low", "messages": user("hi"), "max_tokens": 5000, "quality": "low",
            "ad_preferences": {"categories": ["technology"]}, "user": "alice@example.com", "some_future_field": 1}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let sent = mock.last_body().unwrap();
    assert_eq!(sent["model"], "mock-model");
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["max_tokens"], 1024, "low tier caps max tokens");
    assert_eq!(sent["priority"], 0);
    assert!(sent.get("quality").is_none() && sent.get("ad_preferences").is_none());
    let pseudonym = sent["user"].as_str().unwrap();
    assert!(pseudonym.starts_with("u_") && !pseudonym.contains("alice"));
    assert!(!sent.to_string().contains(&key));
    // The same account always gets the same pseudonym.
    gw.chat(&key, json!({"model": "mock-model", "messages": user("again"), "x": 1})).await;
    assert_eq!(mock.last_body().unwrap()["user"], pseudonym);
    // Ultra via header: priority 3.
    let r = gw.http.post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("x-quality", "ultra")
        .json(&json!({"model": "mock-model", "messages": user("hi")})).send().await.unwrap();
    assert_eq!(r.headers()["x-quality-served"], "ultra");
    assert_eq!(mock.last_body().unwrap()["priority"], 3);
}

#[tokio::test]
async fn inproc_stream_with_and_without_usage() {
    let (gw, _mock, key) = setup().await;
    let r = gw
        .chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": true, "stream_options": {"include_usage": true}}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(text, "The capital of France is Paris.");

    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": true})).await;
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events.iter().all(|e| !e.contains("\"usage\"")), "no usage chunk unless asked: {events:?}");
}

#[tokio::test]
async fn inproc_content_parts_and_roles() {
    let (gw, mock, key) = setup().await;
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "really brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and?"}
    ]);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": messages, "stop": ["\n"], "seed": 7, "n": 1,
        "temperature": 0.5, "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": 0.1, "logit_bias": {"42": 5},
        "max_completion_tokens": 3})).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let sent = mock.last_body().unwrap();
    assert_eq!(sent["messages"].as_array().unwrap().len(), 5);
    assert_eq!(sent["stop"], json!(["\n"]));
    assert_eq!(sent["seed"], 7);
    assert_eq!(sent["max_tokens"], 3);
    assert_eq!(sent["logit_bias"]["42"], 5);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 2})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["message"]["content"], "The capital");
}

/// Table of bad requests: status, OpenAI error type/code/param.
#[tokio::test]
async fn inproc_errors_have_openai_shape() {
    let (gw, mock, key) = setup().await;
    let limited = Gateway::start_with(|c| c.max_body_bytes = 1024).await;
    struct Case {
        name: &'static str,
        body: Value,
        status: u16,
        param: Option<&'static str>,
        code: Option<&'static str>,
    }
    let m = "mock-model";
    let cases = [
        Case { name: "unknown model", body: json!({"model": "nope", "messages": user("x")}), status: 404, param: Some("model"), code: Some("model_not_found") },
        Case { name: "no messages", body: json!({"model": m, "messages": []}), status: 400, param: Some("messages"), code: None },
        Case { name: "missing model", body: json!({"messages": user("x")}), status: 400, param: None, code: None },
        Case { name: "bad role", body: json!({"model": m, "messages": [{"role": "wizard", "content": "x"}]}), status: 400, param: Some("messages[0].role"), code: None },
        Case { name: "temperature", body: json!({"model": m, "messages": user("x"), "temperature": 5}), status: 400, param: Some("temperature"), code: None },
        Case { name: "top_p", body: json!({"model": m, "messages": user("x"), "top_p": 1.5}), status: 400, param: Some("top_p"), code: None },
        Case { name: "n zero", body: json!({"model": m, "messages": user("x"), "n": 0}), status: 400, param: Some("n"), code: None },
        Case { name: "n type", body: json!({"model": m, "messages": user("x"), "n": "two"}), status: 400, param: Some("n"), code: None },
        Case { name: "max_tokens zero", body: json!({"model": m, "messages": user("x"), "max_tokens": 0}), status: 400, param: Some("max_tokens"), code: None },
        Case { name: "top_logprobs alone", body: json!({"model": m, "messages": user("x"), "top_logprobs": 2}), status: 400, param: Some("top_logprobs"), code: None },
        Case { name: "logit_bias range", body: json!({"model": m, "messages": user("x"), "logit_bias": {"1": 101}}), status: 400, param: Some("logit_bias"), code: None },
        Case { name: "five stops", body: json!({"model": m, "messages": user("x"), "stop": ["a","b","c","d","e"]}), status: 400, param: Some("stop"), code: None },
        Case { name: "unknown quality", body: json!({"model": m, "messages": user("x"), "quality": "turbo"}), status: 400, param: Some("quality"), code: None },
        Case { name: "tool_choice without tools", body: json!({"model": m, "messages": user("x"), "tool_choice": "auto"}), status: 400, param: Some("tool_choice"), code: None },
        Case { name: "audio output", body: json!({"model": m, "messages": user("x"), "modalities": ["text", "audio"]}), status: 400, param: Some("audio"), code: None },
    ];
    for case in &cases {
        let r = gw.chat(&key, case.body.clone()).await;
        assert_eq!(r.status(), case.status, "{}", case.name);
        assert!(r.headers().get("x-request-id").is_some(), "{}", case.name);
        let v: Value = r.json().await.unwrap();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|s| !s.is_empty()), "{}: {v}", case.name);
        assert!(e["type"].is_string(), "{}", case.name);
        assert_eq!(e["param"].as_str(), case.param, "{}: {v}", case.name);
        if let Some(code) = case.code {
            assert_eq!(e["code"], code, "{}", case.name);
        }
    }
    assert_eq!(mock.request_count(), 0, "bad requests never reach a provider");

    // Transport-level errors.
    let post = |url: String| gw.http.post(url);
    let r = post(gw.url("/v1/chat/completions")).json(&json!({"model": m, "messages": user("x")})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "invalid_api_key");
    let r = post(gw.url("/v1/chat/completions")).bearer_auth("sk-wrong").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    let r = post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("content-type", "text/plain").body("hello").send().await.unwrap();
    assert_eq!(r.status(), 415);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let lkey = limited.create_key("free").await;
    let big = json!({"model": m, "messages": user(&"x".repeat(4096))});
    let r = limited.http.post(limited.url("/v1/chat/completions")).bearer_auth(&lkey).json(&big).send().await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "request_too_large");
    // A head over the plain listener's cap is refused before routing, with the 431 that
    // every operation in the OpenAPI document lists.
    let long_query = "x".repeat(gateway::edge::listener::MAX_HEAD_BYTES);
    let r = gw.http.get(gw.url(&format!("/v1/models?q={long_query}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 431);
    let doc = gateway::api::spec::document();
    let models = doc.paths.paths.get("/v1/models").and_then(|item| item.get.as_ref()).expect("GET /v1/models is documented");
    assert!(models.responses.responses.contains_key("431"), "431 is documented");
    let r = gw.http.get(gw.url("/v1/nothing-here")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    assert!(gw.usage_rows().await.is_empty(), "refused requests leave no usage record");
}

#[tokio::test]
async fn inproc_feature_the_provider_cannot_honour_is_a_400() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", Some(vec!["stop", "seed"]), &["standard"]).await;
    let key = gw.create_key("free").await;
    for (body_extra, param) in [
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}), "tools"),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"n": 2}), "n"),
    ] {
        let mut body = json!({"model": "mock-model", "messages": user("x")});
        for (k, v) in body_extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = gw.chat(&key, body).await;
        assert_eq!(r.status(), 400, "{param}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], param);
    }
    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": image})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "messages");
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x"), "stop": "\n", "seed": 1})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn inproc_failover_before_first_token_is_invisible() {
    let gw = Gateway::start().await;
    let bad = spawn_mock(MockConfig { fail_status: Some(500), ..MockConfig::default() }).await.unwrap();
    let good = spawn_mock(MockConfig::default()).await.unwrap();
    // The failing provider is the cheapest, so routing tries it first.
    gw.add_provider(&bad, "mock-model", None, &["standard"]).await;
    gw.add_provider_priced(&good, "mock-model", 0.00001).await;
    let key = gw.create_key("free").await;
    for i in 0..12 {
        let stream = i % 2 == 0;
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": stream})).await;
        assert_eq!(r.status(), 200);
        let body = r.text().await.unwrap();
        assert!(body.contains("Paris."), "{body}");
        assert!(!body.contains("error"), "{body}");
    }
    assert!(bad.request_count() > 0, "the failing provider was tried");
    assert!(bad.request_count() <= 3, "traffic shifted away within 3 requests: {}", bad.request_count());
    assert_eq!(good.request_count(), 12);
    let v: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let bad_info = v["data"].as_array().unwrap().iter().find(|p| p["baseUrl"] == bad.url()).unwrap().clone();
    let good_info = v["data"].as_array().unwrap().iter().find(|p| p["baseUrl"] == good.url()).unwrap().clone();
    assert!(bad_info["health"]["failures"].as_u64().unwrap() >= 1);
    assert!(good_info["score"].as_f64().unwrap() > bad_info["score"].as_f64().unwrap());
}

#[tokio::test]
async fn inproc_provider_failures_map_to_502_503() {
    let gw = Gateway::start().await;
    let bad = spawn_mock(MockConfig { fail_status: Some(503), ..MockConfig::default() }).await.unwrap();
    gw.add_provider(&bad, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("free").await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "provider_error");
    // A provider whose server rejects the request: its 400 reaches the client, no failover.
    let ok = spawn_mock(MockConfig::default()).await.unwrap();
    let gw2 = Gateway::start().await;
    gw2.add_provider(&ok, "mock-model", None, &["standard"]).await;
    let key2 = gw2.create_key("free").await;
    let r = gw2.chat(&key2, json!({"model": "mock-model", "messages": user("[reject]")})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["message"], "mock rejects this");
    // The model is served, but not at this quality: 503 with retry-after, not 404.
    let r = gw2.chat(&key2, json!({"model": "mock-model", "messages": user("x"), "quality": "high"})).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    // A provider that is down (connection refused).
    let gw3 = Gateway::start().await;
    let (id, pkey) = gw3.add_provider(&ok, "mock-model", None, &["standard"]).await;
    sqlx::query("UPDATE providers SET base_url = 'http://127.0.0.1:1' WHERE id = $1").bind(&id).execute(&gw3.state.store.pool).await.unwrap();
    gw3.state.registry.reload().await.unwrap();
    let key3 = gw3.create_key("free").await;
    let r = gw3.chat(&key3, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 502);
    let _ = pkey;
}

#[tokio::test]
async fn inproc_slow_first_token_is_a_504() {
    let gw = Gateway::start_with(|c| c.first_token_timeout_secs = 1).await;
    let slow = spawn_mock(MockConfig { first_chunk_delay: Duration::from_secs(3), ..MockConfig::default() }).await.unwrap();
    gw.add_provider(&slow, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("free").await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 504);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "provider_timeout");
}

#[tokio::test]
async fn inproc_mid_stream_failure_ends_with_error_event() {
    let (gw, _mock, key) = setup().await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[fail-mid]"), "stream": true})).await;
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert!(events.iter().any(|e| e.contains("\"The\"")), "tokens before the failure were delivered");
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[fail-mid]")})).await;
    assert_eq!(r.status(), 502);
    let state = gw.shutdown().await;
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.0 == "provider_failed"), "{rows:?}");
    assert_eq!(rows[0].3, 2, "two tokens were delivered before the failure");
}

#[tokio::test]
async fn inproc_client_disconnect_cancels_upstream() {
    let (gw, mock, key) = setup().await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[idle]"), "stream": true})).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    assert_eq!(mock.open_streams.load(Ordering::SeqCst), 1);
    drop(body);
    wait_for("upstream cancellation", || mock.open_streams.load(Ordering::SeqCst) == 0).await;
    assert_eq!(mock.cancelled.load(Ordering::SeqCst), 1);
    let state = gw.shutdown().await;
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, "client_disconnected");
    assert_eq!(rows[0].3, 1, "one token was delivered");
}

/// A provider that declares `capabilities.http2` is called over h2c: its streams share
/// one connection, answers and usage are the same as over HTTP/1.1, and a client that
/// leaves still cancels its upstream stream. One that does not declare it gets HTTP/1.1.
#[tokio::test]
async fn inproc_h2c_provider_multiplexes_streams() {
    let gw = Gateway::start().await;
    let h2 = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider_caps(&h2, json!({"models": ["mock-model"], "maxConcurrentStreams": 64, "http2": true}), &["standard"]).await;
    let plain = spawn_mock(MockConfig { models: vec!["plain-model".into()], ..MockConfig::default() }).await.unwrap();
    gw.add_provider(&plain, "plain-model", None, &["standard"]).await;
    let key = gw.create_key("premium").await;

    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("What is the capital of France?")})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(v["usage"]["completion_tokens"], 6);

    // Several streams open at once, then each read to its end.
    let mut open = Vec::new();
    for _ in 0..5 {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[slow]"), "stream": true})).await;
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    for r in open {
        let events = sse_events(&r.text().await.unwrap());
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
    assert_eq!(h2.http2_requests.load(Ordering::SeqCst), 6, "every request went over HTTP/2");

    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[idle]"), "stream": true})).await;
    let mut body = r.bytes_stream();
    assert!(String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).contains("data:"));
    assert_eq!(h2.open_streams.load(Ordering::SeqCst), 1);
    drop(body);
    wait_for("upstream cancellation over HTTP/2", || h2.open_streams.load(Ordering::SeqCst) == 0).await;
    assert_eq!(h2.cancelled.load(Ordering::SeqCst), 1);

    let r = gw.chat(&key, json!({"model": "plain-model", "messages": user("hi")})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(plain.request_count(), 1);
    assert_eq!(plain.http2_requests.load(Ordering::SeqCst), 0, "no http2 capability, so HTTP/1.1");

    let state = gw.shutdown().await;
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 8);
    assert_eq!(rows.iter().filter(|r| r.0 == "ok" && r.3 == 6).count(), 7);
    assert_eq!(rows.iter().filter(|r| r.0 == "client_disconnected" && r.3 == 1).count(), 1);
}

#[tokio::test]
async fn inproc_graceful_shutdown_lets_streams_finish_and_flushes_usage() {
    let (gw, _mock, key) = setup().await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[slow]"), "stream": true})).await;
    assert_eq!(r.status(), 200);
    for _ in 0..20 {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await;
        assert_eq!(r.status(), 200);
    }
    let reader = tokio::spawn(async move { r.text().await.unwrap() });
    let state = gw.shutdown().await;
    let body = reader.await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "the open stream finished: {body}");
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 21, "every request has its usage record after shutdown");
    assert!(rows.iter().all(|r| r.0 == "ok" && r.3 == 6));
}

#[tokio::test]
async fn inproc_completions_legacy() {
    let (gw, mock, key) = setup().await;
    let r = gw.http.post(gw.url("/v1/completions")).bearer_auth(&key)
        .json(&json!({"model": "mock-model", "prompt": "Say hi", "max_tokens": 4})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "The capital of France");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(mock.last_body().unwrap()["prompt"], "Say hi");
    let r = gw.http.post(gw.url("/v1/completions")).bearer_auth(&key)
        .json(&json!({"model": "mock-model", "prompt": "Say hi", "stream": true})).send().await.unwrap();
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events[0].contains("\"text\""));
    let r = gw.http.post(gw.url("/v1/completions")).bearer_auth(&key)
        .json(&json!({"model": "mock-model", "prompt": [1, 2, 3]})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "prompt");
}

#[tokio::test]
async fn inproc_models_are_the_live_ones() {
    let gw = Gateway::start_with(|c| c.provider_stale_after_secs = 1).await;
    let key = gw.create_key("free").await;
    let list = |gw: &Gateway| {
        let req = gw.http.get(gw.url("/v1/models")).bearer_auth(&key);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(list(&gw).await["data"], json!([]));
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, pkey) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let v = list(&gw).await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "mock-model");
    assert_eq!(v["data"][0]["object"], "model");
    let r = gw.http.get(gw.url("/v1/models/mock-model")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.http.get(gw.url("/v1/models/other")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "model_not_found");
    // Heartbeats keep it live; without them it goes stale.
    let hb = json!({"providerId": id, "activeStreams": 0, "queueLength": 0});
    let r = gw.http.post(gw.url("/api/gpu/heartbeat")).bearer_auth(&pkey).json(&hb).send().await.unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(list(&gw).await["data"], json!([]), "stale provider is off line");
    let r = gw.http.post(gw.url("/api/gpu/heartbeat")).bearer_auth(&pkey).json(&hb).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(list(&gw).await["data"][0]["id"], "mock-model");
    // Stopping the stream takes it off line.
    let r = gw.http.post(gw.url("/api/gpu/stream/stop")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(list(&gw).await["data"], json!([]));
}

#[tokio::test]
async fn inproc_provider_registration_rules() {
    let gw = Gateway::start_with(|c| c.registration = Registration::AdminApproved).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let register = |body: Value| gw.http.post(gw.url("/api/gpu/register")).json(&body).send();
    let caps = json!({"models": ["mock-model"], "maxConcurrentStreams": 2});
    let r = register(json!({"capabilities": caps, "pricing": {"perToken": 0.000002}, "baseUrl": "ftp://x"})).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "baseUrl");
    let r = register(json!({"capabilities": caps, "pricing": {"perToken": -1.0}, "baseUrl": mock.url()})).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = register(json!({"capabilities": {"models": [], "maxConcurrentStreams": 2}, "pricing": {"perToken": 0.1}, "baseUrl": mock.url()})).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = register(json!({"gpuInfo": {"model": "RTX 4090"}, "capabilities": caps, "pricing": {"perToken": 0.000002, "perHour": 0.5, "minimumPayout": 10}, "baseUrl": mock.url()})).await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "pending");
    let (id, pkey) = (v["providerId"].as_str().unwrap().to_owned(), v["providerKey"].as_str().unwrap().to_owned());
    let start = json!({"providerId": id, "model": "mock-model", "quality": "standard"});
    let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth("pk-wrong").json(&start).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "model": "other", "quality": "standard"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(&pkey).json(&start).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let key = gw.create_key("free").await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 404, "a pending provider takes no traffic");
    // Admin API needs the admin key.
    let r = gw.http.get(gw.url("/api/admin/providers")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/approve"), json!({})).await;
    assert_eq!(r.status(), 200);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 200);
    let v: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let p = &v["data"][0];
    assert_eq!(p["id"], id.as_str());
    assert_eq!(p["status"], "active");
    assert_eq!(p["online"], true);
    assert_eq!(p["gpuInfo"]["model"], "RTX 4090");
    assert_eq!(p["pricing"]["perHour"], 0.5);
    assert!((p["pricing"]["perToken"].as_f64().unwrap() - 0.000002).abs() < 1e-12);
    assert!(!v.to_string().contains(&pkey), "provider keys are never shown again");
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/suspend"), json!({})).await;
    assert_eq!(r.status(), 200);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn inproc_keys_create_list_revoke() {
    let (gw, _mock, key) = setup().await;
    let r = gw.admin_post("/api/admin/keys", json!({"name": "x", "tier": "gold"})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "tier");
    let r = gw.http.post(gw.url("/api/admin/keys")).bearer_auth(&key).json(&json!({"name": "x"})).send().await.unwrap();
    assert_eq!(r.status(), 401, "a user key is not an admin key");
    let list: Value = gw.http.get(gw.url("/api/admin/keys")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let entry = &list["data"][0];
    assert_eq!(entry["tier"], "premium");
    assert!(!list.to_string().contains(&key), "secrets are shown once");
    let stored: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys").fetch_all(&gw.state.store.pool).await.unwrap();
    assert!(stored.iter().all(|h| h.len() == 64 && !h.contains(&key)), "stored hashed");
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 200, "the key is cached now");
    let id = entry["id"].as_str().unwrap();
    let r = gw.admin_post(&format!("/api/admin/keys/{id}/revoke"), json!({})).await;
    assert_eq!(r.status(), 200);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("x")})).await;
    assert_eq!(r.status(), 401, "revocation beats the cache at once");
    let r = gw.admin_post("/api/admin/keys/key_nope/revoke", json!({})).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn inproc_seed_simple_api_and_websocket() {
    let (gw, _mock, key) = setup().await;
    let r = gw.http.post(gw.url("/api/llm/inference")).bearer_auth(&key)
        .json(&json!({"prompt": "Capital of France?", "model": "mock-model", "options": {"quality": "low", "maxTokens": 3}}))
        .send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["result"], "The capital of");
    assert_eq!(v["quality"], "low");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let r = gw.http.post(gw.url("/api/llm/inference")).bearer_auth(&key).json(&json!({"model": "mock-model"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = gw.http.get(gw.url("/api/llm/models")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["models"][0]["id"], "mock-model");
    assert_eq!(v["models"][0]["qualities"], json!(["low", "standard", "ultra"]));
    let v: Value = gw.http.get(gw.url("/api/llm/status")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["providersOnline"], 1);

    use tokio_tungstenite::tungstenite::Message;
    let ws_url = format!("{}/api/llm/ws?api_key={key}", gw.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let next = |m: Message| -> Value { serde_json::from_str(m.to_text().unwrap()).unwrap() };
    let connected = next(ws.next().await.unwrap().unwrap());
    assert_eq!(connected["event"], "connected");
    futures::SinkExt::send(&mut ws, Message::Text(json!({"id": 1, "prompt": "hi", "model": "mock-model"}).to_string().into())).await.unwrap();
    let mut tokens = String::new();
    loop {
        let v = next(ws.next().await.unwrap().unwrap());
        match v["event"].as_str().unwrap() {
            "stream:token" => tokens.push_str(v["data"]["token"].as_str().unwrap()),
            "stream:end" => {
                assert_eq!(v["data"]["result"], tokens.as_str());
                assert_eq!(v["data"]["usage"]["completion_tokens"], 6);
                break;
            }
            other => panic!("unexpected event {other}: {v}"),
        }
    }
    assert_eq!(tokens, "The capital of France is Paris.");
    futures::SinkExt::send(&mut ws, Message::Text(json!({"id": 2, "prompt": "hi", "model": "nope"}).to_string().into())).await.unwrap();
    let v = next(ws.next().await.unwrap().unwrap());
    assert_eq!(v["event"], "error");
    assert_eq!(v["data"]["error"]["code"], "model_not_found");
    let bad = format!("{}/api/llm/ws?api_key=sk-bad", gw.base.replace("http://", "ws://"));
    assert!(tokio_tungstenite::connect_async(bad).await.is_err(), "a bad key cannot open the socket");
}

#[tokio::test]
async fn inproc_health_and_request_ids() {
    let (gw, _mock, _key) = setup().await;
    let r = gw.http.get(gw.url("/health")).header("x-request-id", "my-trace-1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Our own id keys billing, so it is always ours; the client's comes back beside it.
    let ours = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(ours.starts_with("req_") && ours != "my-trace-1");
    assert_eq!(r.headers()["x-client-request-id"], "my-trace-1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["database"], "ok");
}

#[tokio::test]
async fn inproc_usage_recorded_per_request_in_batches() {
    let (gw, _mock, key) = setup().await;
    let mut handles = Vec::new();
    for i in 0..40 {
        let (http, url, key) = (gw.http.clone(), gw.url("/v1/chat/completions"), key.clone());
        handles.push(tokio::spawn(async move {
            http.post(url).bearer_auth(key).json(&json!({"model": "mock-model", "messages": user("hi"), "stream": i % 2 == 0}))
                .send().await.unwrap().text().await.unwrap()
        }));
    }
    for h in handles {
        assert!(h.await.unwrap().contains("Paris."));
    }
    let state = gw.shutdown().await;
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 40);
    assert!(rows.iter().all(|r| r.0 == "ok" && r.2 >= 1 && r.3 == 6 && r.1.starts_with("prov_")));
}

#[tokio::test]
async fn inproc_https_with_rustls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let mut config = test_config(fresh_database(&dir).await.0);
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    config.max_connections_per_ip = 3;
    let store = Store::connect(&config.database_url).await.unwrap();
    let running = Running::start_with_store(config, store).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(server::serve(running, listener, async move {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let r = client.get(format!("https://localhost:{port}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    let plain = reqwest::get(format!("http://localhost:{port}/health")).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true), "plain HTTP is not served on the TLS port");
    // `max_connections_per_ip` holds here too, before the handshake.
    drop(client);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let fresh = || reqwest::Client::builder().danger_accept_invalid_certs(true).pool_max_idle_per_host(0).build().unwrap();
    assert!(fresh().get(format!("https://127.0.0.1:{port}/health")).send().await.is_err(), "a fourth connection is refused");
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if fresh().get(format!("https://127.0.0.1:{port}/health")).send().await.is_ok_and(|r| r.status() == 200) {
            served = true;
            break;
        }
    }
    assert!(served, "served again once the others closed");
    tx.send(()).unwrap();
    done.await.unwrap().unwrap();
}
