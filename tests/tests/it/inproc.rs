//! In-process suite: the real gateway (`server::serve` over `app()`) on an ephemeral
//! port, in front of counted mock providers, on SQLite or PostgreSQL (`GS_TEST_DB`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use gateway::config::{Config, Registration, Secret};
use gateway::server::{self, Running};
use gateway::store::Store;
use gateway::AppState;
use serde_json::{json, Value};
use sqlx::Row;
use tests::{spawn_mock, MockConfig, MockProvider};
use tokio::sync::oneshot;

pub(crate) const ADMIN: &str = "admin-key-for-tests-0123";
pub(crate) const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One gateway with its own fresh database.
pub(crate) struct Gateway {
    base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) state: AppState,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// A fresh database for one test: a SQLite file in `dir`, or a new schema in the
/// PostgreSQL test database when `GS_TEST_DB=postgres`. Returns its URL and the schema.
pub(crate) async fn fresh_database(dir: &tempfile::TempDir) -> (String, Option<String>) {
    match std::env::var("GS_TEST_DB").as_deref() {
        Ok("postgres") => {
            let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(PG_URL).await.expect("PostgreSQL at 127.0.0.1:5432 (scripts/test.sh starts it)");
            sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.expect("create schema");
            pool.close().await;
            (format!("{PG_URL}?options=-c%20search_path%3D{schema}"), Some(schema))
        }
        Ok("sqlite") | Err(_) => (format!("sqlite://{}", dir.path().join("gw.db").display()), None),
        Ok(other) => panic!("GS_TEST_DB must be sqlite or postgres, not {other}"),
    }
}

fn test_config(url: String) -> Config {
    Config {
        database_url: url,
        admin_key: Some(Secret::new(ADMIN)),
        // The mock providers listen on 127.0.0.1.
        allow_private_providers: true,
        // Providers the tests register are trusted and free keys are not capped,
        // unless a test says otherwise (the bounds suite tests both).
        probation_requests: 0,
        free_tier_daily_budget: 1_000.0,
        first_token_timeout_secs: 5,
        idle_chunk_timeout_secs: 5,
        usage_flush_ms: 5,
        shutdown_grace_secs: 5,
        ..Config::default()
    }
}

impl Gateway {
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub(crate) async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = fresh_database(&dir).await.0;
        Self::start_on(url, dir, tweak).await
    }

    /// A gateway on an existing database (a restart, or a second replica).
    pub(crate) async fn start_on(url: String, dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(url);
        tweak(&mut config);
        let store = Store::connect(&config.database_url).await.unwrap();
        let running = Running::start_with_store(config, store).await.unwrap();
        let state = running.state.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(server::serve(running, listener, async move {
            let _ = rx.await;
        }));
        Self { base, http: reqwest::Client::new(), state, stop: Some(tx), done: Some(done), _dir: dir }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) async fn admin_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(ADMIN).json(&body).send().await.unwrap()
    }

    /// A key; premium keys come with $10 of credit so they can pay.
    pub(crate) async fn create_key(&self, tier: &str) -> String {
        let (key, user) = self.create_unfunded_key(tier).await;
        if tier == "premium" {
            self.credit(&user, 10_000_000).await;
        }
        key
    }

    /// `(key, user id)` with no credit.
    pub(crate) async fn create_unfunded_key(&self, tier: &str) -> (String, String) {
        let r = self.admin_post("/api/admin/keys", json!({"name": "t", "tier": tier})).await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        let key = v["key"].as_str().unwrap().to_owned();
        assert!(key.starts_with("sk-"));
        (key, v["userId"].as_str().unwrap().to_owned())
    }

    pub(crate) async fn credit(&self, user: &str, micros: i64) -> Value {
        let r = self.admin_post(&format!("/api/admin/users/{user}/credit"), json!({"amountMicros": micros})).await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub(crate) async fn balance(&self, account: &str) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT posted FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&self.state.store.pool)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    pub(crate) async fn ledger_is_clean(&self) {
        let report = gateway::ledger::Ledger::new(self.state.store.clone()).check().await.unwrap();
        assert!(report.violations.is_empty(), "{:?}", report.violations);
    }

    /// Registers `mock` for `model` and puts it on line at the given qualities.
    pub(crate) async fn add_provider(&self, mock: &MockProvider, model: &str, features: Option<Vec<&str>>, qualities: &[&str]) -> (String, String) {
        self.add_provider_with(mock, model, features, qualities, 64).await
    }

    pub(crate) async fn add_provider_with(&self, mock: &MockProvider, model: &str, features: Option<Vec<&str>>, qualities: &[&str], capacity: u32) -> (String, String) {
        let mut caps = json!({"models": [model], "maxConcurrentStreams": capacity});
        if let Some(f) = features {
            caps["features"] = json!(f);
        }
        self.add_provider_caps(mock, caps, qualities).await
    }

    /// Registers `mock` with these capabilities and puts it on line at the given
    /// qualities of its first model.
    pub(crate) async fn add_provider_caps(&self, mock: &MockProvider, caps: Value, qualities: &[&str]) -> (String, String) {
        let model = caps["models"][0].as_str().unwrap().to_owned();
        let r = self
            .http
            .post(self.url("/api/gpu/register"))
            .json(&json!({"gpuInfo": {"model": "test"}, "capabilities": caps, "pricing": {"perToken": 0.000002}, "baseUrl": mock.url()}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        let (id, key) = (v["providerId"].as_str().unwrap().to_owned(), v["providerKey"].as_str().unwrap().to_owned());
        assert!(key.starts_with("pk-"));
        for q in qualities {
            let r = self
                .http
                .post(self.url("/api/gpu/stream/start"))
                .bearer_auth(&key)
                .json(&json!({"providerId": id, "model": model, "quality": q}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
        (id, key)
    }

    /// Registers `mock` at a given per-token price (USD), on line at `standard`.
    async fn add_provider_priced(&self, mock: &MockProvider, model: &str, per_token: f64) -> String {
        let body = json!({"capabilities": {"models": [model], "maxConcurrentStreams": 64}, "pricing": {"perToken": per_token}, "baseUrl": mock.url()});
        let v: Value = self.http.post(self.url("/api/gpu/register")).json(&body).send().await.unwrap().json().await.unwrap();
        let id = v["providerId"].as_str().unwrap().to_owned();
        let r = self.http.post(self.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
            .json(&json!({"providerId": id, "model": model, "quality": "standard"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        id
    }

    pub(crate) async fn chat(&self, key: &str, body: Value) -> reqwest::Response {
        self.http.post(self.url("/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap()
    }

    /// Stops the server gracefully and waits for usage to be flushed.
    async fn shutdown(mut self) -> AppState {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            done.await.unwrap().unwrap();
        }
        self.state.clone()
    }

    pub(crate) async fn usage_rows(&self) -> Vec<(String, String, i64, i64)> {
        usage_rows(&self.state).await
    }
}

async fn usage_rows(state: &AppState) -> Vec<(String, String, i64, i64)> {
    sqlx::query("SELECT status, provider_id, prompt_tokens, completion_tokens FROM usage_records ORDER BY created_at")
        .fetch_all(&state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("status"),
                r.get::<Option<String>, _>("provider_id").unwrap_or_default(),
                r.get::<i64, _>("prompt_tokens"),
                r.get::<i64, _>("completion_tokens"),
            )
        })
        .collect()
}

async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn setup() -> (Gateway, MockProvider, String) {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard", "low", "ultra"]).await;
    let key = gw.create_key("premium").await;
    (gw, mock, key)
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Parses an SSE body into its data payloads.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

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
    let long_query = "x".repeat(gateway::server::MAX_HEAD_BYTES);
    let r = gw.http.get(gw.url(&format!("/v1/models?q={long_query}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 431);
    let doc = gateway::api_spec::document();
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

/// Mock pricing: $0.000002 per token = 2 µUSD; "hi" is 1 prompt token + 6 completion.
const HI_COST: i64 = 14;

#[tokio::test]
async fn inproc_ledger_paying_user_is_charged_exactly_once() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, _) = gw.add_provider(&mock, "mock-model", None, &["standard", "low", "ultra"]).await;
    let (key, uid) = gw.create_unfunded_key("premium").await;
    // No credit: refused before any provider is called.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota");
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(mock.request_count(), 0);
    let v = gw.credit(&uid, 1_000_000).await;
    assert_eq!(v["balanceMicros"], 1_000_000);
    // Non-stream: usage.cost in USD, balance down by exactly that.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert!((v["usage"]["cost"].as_f64().unwrap() - HI_COST as f64 / 1e6).abs() < 1e-12, "{v}");
    let account = format!("user:{uid}");
    assert_eq!(gw.balance(&account).await, 1_000_000 - HI_COST, "durable before the response");
    // Stream: the usage chunk carries the cost too.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": true, "stream_options": {"include_usage": true}})).await;
    let events = sse_events(&r.text().await.unwrap());
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!((usage["usage"]["cost"].as_f64().unwrap() - HI_COST as f64 / 1e6).abs() < 1e-12);
    assert_eq!(gw.balance(&account).await, 1_000_000 - 2 * HI_COST, "settled before [DONE]");
    // Tiers: low is 0.8×, ultra 2.0×.
    gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "low"})).await;
    assert_eq!(gw.balance(&account).await, 1_000_000 - 2 * HI_COST - 12, "0.8 × 14 = 11.2 → 12 (rounded up)");
    gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "ultra"})).await;
    let spent = 2 * HI_COST + 12 + 28;
    assert_eq!(gw.balance(&account).await, 1_000_000 - spent);
    // The provider earns the charge less the 10% platform fee (rounded down per request).
    let fees = 1 + 1 + 1 + 2;
    assert_eq!(gw.balance(&format!("provider:{provider}")).await, spent - fees);
    assert_eq!(gw.balance("platform:fees").await, fees);
    // Held funds as the ledger sees them: rows on PostgreSQL, the hold book on SQLite.
    assert_eq!(gw.state.ledger.balance(&account).await.unwrap().held, 0, "every hold was released");
    // The provider sees its balance with its own key.
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_free_tier_is_paid_from_ad_revenue() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, pkey) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("free").await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    assert_eq!(gw.balance("platform:ad_revenue").await, -3 * HI_COST);
    assert_eq!(gw.balance(&format!("provider:{provider}")).await, 3 * (HI_COST - 1));
    let r = gw.http.get(gw.url(&format!("/api/payment/balance/{provider}"))).bearer_auth(&pkey).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["balanceMicros"], 3 * (HI_COST - 1));
    let r = gw.http.get(gw.url(&format!("/api/payment/balance/{provider}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 401, "a user key cannot read a provider's balance");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_concurrent_requests_never_overspend() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider_with(&mock, "mock-model", None, &["standard"], 1_000).await;
    let body = json!({"model": "mock-model", "messages": user("[idle]"), "max_tokens": 10, "stream": true});
    // Learn the hold one such request takes (another user, same body size)...
    let (probe_key, probe_user) = gw.create_unfunded_key("premium").await;
    gw.credit(&probe_user, 1_000_000).await;
    let probe = gw.chat(&probe_key, body.clone()).await;
    assert_eq!(probe.status(), 200);
    let hold = gw.state.ledger.balance(&format!("user:{probe_user}")).await.unwrap().held;
    assert!(hold > 0, "the open stream holds funds");
    if let Some(book) = &gw.state.store.book {
        // SQLite: request holds live in memory; the request path wrote no hold row.
        assert_eq!(book.open(), 1);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM holds").fetch_one(&gw.state.store.pool).await.unwrap();
        assert_eq!(rows, 0);
    }
    drop(probe);
    // ...then fund exactly 100 of them.
    let (key, uid) = gw.create_unfunded_key("premium").await;
    let account = format!("user:{uid}");
    gw.credit(&uid, 100 * hold).await;
    let mut handles = Vec::new();
    for _ in 0..200 {
        let (http, url, key, body) = (gw.http.clone(), gw.url("/v1/chat/completions"), key.clone(), body.clone());
        handles.push(tokio::spawn(async move { http.post(url).bearer_auth(key).json(&body).send().await.unwrap() }));
    }
    let mut open = Vec::new();
    let mut refused = 0;
    for h in handles {
        let r = h.await.unwrap();
        match r.status().as_u16() {
            200 => open.push(r),
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(open.len(), 100, "exactly the funded number run at once");
    assert_eq!(refused, 100);
    drop(open);
    wait_until_no_holds(&gw, &account).await;
    let after = gw.balance(&account).await;
    assert!(after >= 0 && after < 100 * hold, "delivered tokens were billed: {after}");
    gw.ledger_is_clean().await;
}

async fn wait_until_no_holds(gw: &Gateway, account: &str) {
    for _ in 0..300 {
        if gw.state.ledger.balance(account).await.unwrap().held == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("holds were not released");
}

#[tokio::test]
async fn inproc_ledger_cut_streams_bill_delivered_tokens() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, _) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (key, uid) = gw.create_unfunded_key("premium").await;
    gw.credit(&uid, 1_000_000).await;
    let account = format!("user:{uid}");
    // The client leaves after the first token.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[idle]"), "stream": true})).await;
    let mut body = r.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    wait_until_no_holds(&gw, &account).await;
    // The provider dies after two tokens.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("[fail-mid]"), "stream": true})).await;
    assert!(r.text().await.unwrap().contains("\"error\""));
    wait_until_no_holds(&gw, &account).await;
    let state = gw.state.clone();
    let rows: Vec<(String, i64, i64, String)> = sqlx::query("SELECT status, completion_tokens, cost_micros, usage_source FROM usage_records ORDER BY created_at")
        .fetch_all(&state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("status"), r.get("completion_tokens"), r.get("cost_micros"), r.get("usage_source")))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("client_disconnected", 1));
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("provider_failed", 2));
    assert!(rows.iter().all(|r| r.2 > 0 && r.3 == "gateway"), "billed on our own count: {rows:?}");
    let charged: i64 = rows.iter().map(|r| r.2).sum();
    assert_eq!(gw.balance(&account).await, 1_000_000 - charged, "exactly the delivered tokens");
    assert!(gw.balance(&format!("provider:{provider}")).await > 0);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_admin_credit_validation() {
    let gw = Gateway::start().await;
    let (_, uid) = gw.create_unfunded_key("premium").await;
    for (body, status) in [
        (json!({"amount": -5}), 400),
        (json!({}), 400),
        (json!({"amount": "ten"}), 400),
        (json!({"amount": 12.5}), 200),
    ] {
        let r = gw.admin_post(&format!("/api/admin/users/{uid}/credit"), body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
    }
    let r = gw.admin_post("/api/admin/users/user_nope/credit", json!({"amount": 1})).await;
    assert_eq!(r.status(), 404);
    let v: Value = gw.http.get(gw.url(&format!("/api/admin/users/{uid}/balance"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["balanceMicros"], 12_500_000);
    assert_eq!(v["balance"], 12.5);
    gw.ledger_is_clean().await;
}

/// A provider with `usd` of earnings (posted as an adjustment from outside).
async fn provider_with_earnings(gw: &Gateway, usd: i64) -> (String, String) {
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (id, key) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    gw.state.ledger.credit(&format!("provider:{id}"), usd * 1_000_000, "adjustment", "test earnings").await.unwrap();
    (id, key)
}

/// A suspended provider's balance is frozen, not lost: no withdrawal and no automatic
/// payout until an admin approves it again.
#[tokio::test]
async fn inproc_payouts_a_suspended_provider_cannot_withdraw() {
    let gw = Gateway::start().await;
    let (id, pkey) = provider_with_earnings(&gw, 40).await;
    let r = gw.http.put(gw.url("/api/payment/method")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "method": {"type": "paypal", "email": "gpu@example.com"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/suspend"), json!({})).await;
    assert_eq!(r.status(), 200);
    let withdraw = || gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&pkey).json(&json!({"providerId": id, "amount": 10.0})).send();
    let r = withdraw().await.unwrap();
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("frozen"), "{e}");
    let r = gw.admin_post("/api/admin/payouts/auto", json!({})).await;
    assert_eq!(r.status(), 200);
    let made: Value = r.json().await.unwrap();
    assert!(!made.to_string().contains(&id), "no automatic payout for a suspended provider: {made}");
    assert_eq!(gw.balance(&format!("provider:{id}")).await, 40_000_000, "the balance is kept");
    let r = gw.admin_post(&format!("/api/admin/providers/{id}/approve"), json!({})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(withdraw().await.unwrap().status(), 201);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_payouts_withdraw_idempotent_state_machine() {
    let gw = Gateway::start().await;
    let (id, pkey) = provider_with_earnings(&gw, 20).await;
    let account = format!("provider:{id}");
    let post = |path: &str, body: Value, idem: Option<&str>| {
        let mut req = gw.http.post(gw.url(path)).bearer_auth(&pkey).json(&body);
        if let Some(k) = idem {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    // A payout method first; bad details are refused.
    let r = gw.http.put(gw.url("/api/payment/method")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "method": {"type": "paypal", "email": "nope"}})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = gw.http.put(gw.url("/api/payment/method")).bearer_auth(&pkey)
        .json(&json!({"providerId": id, "method": {"type": "paypal", "email": "gpu@example.com"}})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 3.0}), None).await.unwrap();
    assert_eq!(r.status(), 400, "below the 5.00 minimum");
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "amount");
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 10.0}), Some("k1")).await.unwrap();
    assert_eq!(r.status(), 201);
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["status"], "requested");
    assert_eq!(first["fee"], 0.25, "2.5% processing fee");
    assert_eq!(first["net"], 9.75);
    let again: Value = post("/api/payment/withdraw", json!({"providerId": id, "amount": 10.0}), Some("k1")).await.unwrap().json().await.unwrap();
    assert_eq!(again["id"], first["id"], "same key, same result");
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 11.0}), Some("k1")).await.unwrap();
    assert_eq!(r.status(), 409, "same key, different body");
    assert_eq!(gw.balance(&account).await, 10_000_000, "paid out once");
    let r = post("/api/payment/withdraw", json!({"providerId": id, "amount": 10.01}), None).await.unwrap();
    assert_eq!(r.status(), 400, "more than available");
    // Another provider's key cannot withdraw from this one.
    let (_, other_key) = provider_with_earnings(&gw, 1).await;
    let r = gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&other_key).json(&json!({"providerId": id, "amount": 5.0})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // requested → processing → paid; paid is final.
    let wid = first["id"].as_str().unwrap();
    for (action, status) in [("processing", 200), ("paid", 200), ("failed", 409)] {
        let r = gw.admin_post(&format!("/api/admin/payouts/{wid}/{action}"), json!({})).await;
        assert_eq!(r.status(), status, "{action}");
    }
    assert_eq!(gw.balance("platform:payouts").await, 0);
    assert_eq!(gw.balance("platform:fees").await, 250_000);
    // A failed withdrawal returns the funds.
    let w: Value = post("/api/payment/withdraw", json!({"providerId": id, "amount": 6.0}), Some("k2")).await.unwrap().json().await.unwrap();
    assert_eq!(gw.balance(&account).await, 4_000_000);
    let r = gw.admin_post(&format!("/api/admin/payouts/{}/failed", w["id"].as_str().unwrap()), json!({"reason": "bank said no"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["failureReason"], "bank said no");
    assert_eq!(gw.balance(&account).await, 10_000_000);
    // Concurrent retries of one request pay once.
    let mut handles = Vec::new();
    for _ in 0..10 {
        let (http, url, pkey, id) = (gw.http.clone(), gw.url("/api/payment/withdraw"), pkey.clone(), id.clone());
        handles.push(tokio::spawn(async move {
            http.post(url).bearer_auth(pkey).header("idempotency-key", "k3").json(&json!({"providerId": id, "amount": 5.0})).send().await.unwrap().json::<Value>().await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap()["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(gw.balance(&account).await, 5_000_000);
    let list: Value = gw.http.get(gw.url(&format!("/api/payment/withdrawals/{id}"))).bearer_auth(&pkey).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
    let pending: Value = gw.http.get(gw.url("/api/admin/payouts?status=requested")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(pending["data"].as_array().unwrap().len(), 1);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_payout_settings_and_auto_payouts() {
    let gw = Gateway::start().await;
    let v: Value = gw.http.get(gw.url("/api/admin/settings")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(v, json!({"minimumWithdrawal": 5.0, "autoPayoutThreshold": 25.0, "processingFee": 2.5}));
    let patch = |body: Value| gw.http.patch(gw.url("/api/admin/settings")).bearer_auth(ADMIN).json(&body).send();
    assert_eq!(patch(json!({"processingFee": 90})).await.unwrap().status(), 400);
    assert_eq!(patch(json!({"minimumWithdrawl": 1})).await.unwrap().status(), 400, "unknown setting");
    let v: Value = patch(json!({"autoPayoutThreshold": 30, "processingFee": 1})).await.unwrap().json().await.unwrap();
    assert_eq!(v["autoPayoutThreshold"], 30.0);
    let (rich, rich_key) = provider_with_earnings(&gw, 40).await;
    let (_poor, poor_key) = provider_with_earnings(&gw, 20).await;
    for (id, key) in [(&rich, &rich_key), (&_poor, &poor_key)] {
        gw.http.put(gw.url("/api/payment/method")).bearer_auth(key)
            .json(&json!({"providerId": id, "method": {"type": "crypto", "address": "bc1qxy2kgdygjrsqtzq2n0yrf2493p83kkfjhx0wlh"}})).send().await.unwrap();
    }
    let made: Value = gw.admin_post("/api/admin/payouts/auto", json!({})).await.json().await.unwrap();
    let made = made["data"].as_array().unwrap();
    assert_eq!(made.len(), 1, "only the provider above the threshold");
    assert_eq!(made[0]["providerId"], rich.as_str());
    assert_eq!(made[0]["amount"], 40.0);
    assert_eq!(made[0]["fee"], 0.4);
    assert_eq!(made[0]["automatic"], true);
    let again: Value = gw.admin_post("/api/admin/payouts/auto", json!({})).await.json().await.unwrap();
    assert_eq!(again["data"], json!([]), "no second payout while one is open");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_topup_webhook_is_signed_and_applied_once() {
    use hmac::{Hmac, Mac};
    let gw = Gateway::start_with(|c| c.topup_webhook_secret = Some(Secret::new("whsec-test"))).await;
    let (_, uid) = gw.create_unfunded_key("premium").await;
    let body = json!({"eventId": "evt_1", "userId": uid, "amount": 25.0}).to_string();
    let sign = |b: &str| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec-test").unwrap();
        mac.update(b.as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let send = |sig: String| gw.http.post(gw.url("/api/payment/topup")).header("content-type", "application/json").header("x-signature", sig).body(body.clone()).send();
    assert_eq!(send("sha256=00".into()).await.unwrap().status(), 401);
    let v: Value = send(sign(&body)).await.unwrap().json().await.unwrap();
    assert_eq!(v["applied"], true);
    let v: Value = send(sign(&body)).await.unwrap().json().await.unwrap();
    assert_eq!(v["applied"], false, "a retried event applies once");
    assert_eq!(gw.balance(&format!("user:{uid}")).await, 25_000_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_history_and_analytics() {
    let (gw, _mock, key) = setup().await;
    let free = gw.create_key("free").await;
    for k in [&key, &key, &key, &free] {
        assert_eq!(gw.chat(k, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    gw.chat(&key, json!({"model": "mock-model", "messages": user("[fail-mid]")})).await;
    let keys: Value = gw.http.get(gw.url("/api/admin/keys")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let uid = keys["data"].as_array().unwrap().iter().find(|k| k["tier"] == "premium").unwrap()["userId"].as_str().unwrap().to_owned();
    // The failed request is settled without anyone waiting for it.
    wait_until_no_holds(&gw, &format!("user:{uid}")).await;
    let page: Value = gw.http.get(gw.url(&format!("/api/admin/users/{uid}/transactions?limit=2"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["data"][0]["kind"], "usage");
    let cursor = page["nextCursor"].as_str().unwrap();
    let rest: Value = gw.http.get(gw.url(&format!("/api/admin/users/{uid}/transactions?limit=50&before={cursor}"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let rest = rest["data"].as_array().unwrap();
    assert_eq!(rest.len(), 3, "2 more usage entries and the credit: {rest:?}");
    assert_eq!(rest.last().unwrap()["kind"], "credit");
    let revenue: Value = gw.http.get(gw.url("/api/analytics/revenue")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert!(revenue["total"]["fees"].as_f64().unwrap() > 0.0, "{revenue}");
    assert!(revenue["bySource"]["ads"].as_f64().unwrap() < 0.0, "free-tier tokens were paid from ad revenue");
    // Every USD amount comes with its exact micro-USD twin.
    let ads_micros = revenue["bySource"]["adsMicros"].as_i64().unwrap();
    assert!((ads_micros as f64 / 1e6 - revenue["bySource"]["ads"].as_f64().unwrap()).abs() < 1e-9, "{revenue}");
    assert_eq!(revenue["daily"][0]["adsMicros"], ads_micros);
    assert_eq!(revenue["byModel"][0]["key"], "mock-model");
    assert_eq!(revenue["daily"].as_array().unwrap().len(), 1);
    let usage: Value = gw.http.get(gw.url("/api/analytics/usage")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(usage["requests"], 5);
    assert!((usage["errorRate"].as_f64().unwrap() - 0.2).abs() < 1e-9);
    assert_eq!(usage["activeProviders"], 1);
    assert_eq!(usage["byModelAndQuality"][0]["quality"], "standard");
    let r = gw.http.get(gw.url("/api/analytics/usage")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 401, "analytics are admin-only");
}

#[tokio::test]
async fn inproc_ledger_spending_limits_per_key() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let r = gw.admin_post("/api/admin/keys", json!({"name": "capped", "tier": "premium", "dailyLimit": 0.001})).await;
    let v: Value = r.json().await.unwrap();
    let (key, uid) = (v["key"].as_str().unwrap().to_owned(), v["userId"].as_str().unwrap().to_owned());
    gw.credit(&uid, 1_000_000).await;
    // Each request holds about (body + 100 tokens) × 2 µUSD ≈ 0.0007 USD; the limit is 0.001 USD.
    let body = json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 100});
    let mut served = 0;
    let mut refused = None;
    for _ in 0..40 {
        let r = gw.chat(&key, body.clone()).await;
        match r.status().as_u16() {
            200 => served += 1,
            429 => {
                refused = Some(r.json::<Value>().await.unwrap());
                break;
            }
            s => panic!("status {s}"),
        }
    }
    let refused = refused.expect("the daily limit stops the key");
    assert_eq!(refused["error"]["code"], "spending_limit_exceeded");
    assert!(served > 0);
    let spent: i64 = sqlx::query_scalar("SELECT CAST(SUM(cost_micros) AS BIGINT) FROM usage_records").fetch_one(&gw.state.store.pool).await.unwrap();
    assert!(spent <= 1_000, "never above the limit: {spent}");
    // Another key of the same user has no limit.
    let other: Value = gw.admin_post("/api/admin/keys", json!({"name": "free-hand", "tier": "premium", "userId": uid})).await.json().await.unwrap();
    assert_eq!(gw.chat(other["key"].as_str().unwrap(), body).await.status(), 200);
    let r = gw.admin_post("/api/admin/keys", json!({"name": "bad", "dailyLimit": -1})).await;
    assert_eq!(r.status(), 400);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_reservations_lease_a_provider_by_the_hour() {
    let gw = Gateway::start().await;
    let a = spawn_mock(MockConfig::default()).await.unwrap();
    let b = spawn_mock(MockConfig::default()).await.unwrap();
    // Provider A: $3.60/hour = 1000 µUSD per second.
    let register = |mock: &MockProvider, per_hour: f64| {
        let body = json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.000002, "perHour": per_hour}, "baseUrl": mock.url()});
        gw.http.post(gw.url("/api/gpu/register")).json(&body).send()
    };
    let mut ids = Vec::new();
    for (mock, price) in [(&a, 3.6), (&b, 7.2)] {
        let v: Value = register(mock, price).await.unwrap().json().await.unwrap();
        let r = gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
            .json(&json!({"providerId": v["providerId"], "model": "mock-model", "quality": "standard"})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        ids.push(v["providerId"].as_str().unwrap().to_owned());
    }
    let (key, uid) = gw.create_unfunded_key("premium").await;
    let reserve = |body: Value, key: String| gw.http.post(gw.url("/api/llm/reservations")).bearer_auth(key).json(&body).send();
    let r = reserve(json!({"model": "mock-model", "hours": 1}), key.clone()).await.unwrap();
    assert_eq!(r.status(), 429, "the hour must be covered by the balance");
    gw.credit(&uid, 10_000_000).await;
    let r = reserve(json!({"model": "mock-model", "hours": 0}), key.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = reserve(json!({"model": "mock-model", "hours": 1}), key.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    let rsv: Value = r.json().await.unwrap();
    assert_eq!(rsv["providerId"], ids[0].as_str(), "the cheapest free provider");
    assert_eq!(rsv["maxCost"], 3.6);
    let rid = rsv["id"].as_str().unwrap().to_owned();
    let account = format!("user:{uid}");
    // Requests on the reservation go only to A and are not billed per token.
    for _ in 0..3 {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "reservation": rid})).await;
        assert_eq!(r.status(), 200);
    }
    let r = gw.http.post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("x-reservation-id", &rid)
        .json(&json!({"model": "mock-model", "messages": user("hi")})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.request_count(), 4);
    // Everyone else's traffic avoids the reserved provider.
    let other = gw.create_key("premium").await;
    for _ in 0..4 {
        assert_eq!(gw.chat(&other, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    assert_eq!(a.request_count(), 4);
    assert_eq!(b.request_count(), 4);
    let r = gw.chat(&other, json!({"model": "mock-model", "messages": user("hi"), "reservation": rid})).await;
    assert_eq!(r.status(), 400, "someone else's reservation");
    let r = reserve(json!({"providerId": ids[0], "hours": 1}), other.clone()).await.unwrap();
    assert_eq!(r.status(), 400, "already reserved");
    let r = reserve(json!({"model": "no-such-model", "hours": 1}), other.clone()).await.unwrap();
    assert_eq!(r.status(), 404, "a model nobody serves");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The stale-hold sweeper (here with a zero TTL) leaves a live reservation's hold alone:
    // a lease may last longer than the TTL, and a voided hold would never be charged.
    gateway::ledger::Ledger::new(gw.state.store.clone()).sweep_stale_holds(0).await.unwrap();
    let r = gw.http.delete(gw.url(&format!("/api/llm/reservations/{rid}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["status"], "released");
    let charged = (done["charged"].as_f64().unwrap() * 1e6).round() as i64;
    assert!((1_500..=3_000).contains(&charged), "billed per second of use: {charged}");
    assert_eq!(gw.balance(&account).await, 10_000_000 - charged, "the rest is refunded, tokens were not billed");
    assert_eq!(gw.balance(&format!("provider:{}", ids[0])).await, charged - charged / 10);
    let r = gw.http.delete(gw.url(&format!("/api/llm/reservations/{rid}"))).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 409);
    // After release, A serves everyone again.
    gw.chat(&other, json!({"model": "mock-model", "messages": user("hi")})).await;
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "reservation": rid})).await;
    assert_eq!(r.status(), 400, "an ended reservation cannot be used");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_reservation_expires_and_charges_the_full_period() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let body = json!({"capabilities": {"models": ["mock-model"], "maxConcurrentStreams": 8}, "pricing": {"perToken": 0.000002, "perHour": 3.6}, "baseUrl": mock.url()});
    let v: Value = gw.http.post(gw.url("/api/gpu/register")).json(&body).send().await.unwrap().json().await.unwrap();
    gw.http.post(gw.url("/api/gpu/stream/start")).bearer_auth(v["providerKey"].as_str().unwrap())
        .json(&json!({"providerId": v["providerId"], "model": "mock-model", "quality": "standard"})).send().await.unwrap();
    let (key, uid) = gw.create_unfunded_key("premium").await;
    gw.credit(&uid, 1_000_000).await;
    // 0.0003 h = 1.08 s at 1000 µUSD/s.
    let rsv: Value = gw.http.post(gw.url("/api/llm/reservations")).bearer_auth(&key)
        .json(&json!({"model": "mock-model", "hours": 0.0003})).send().await.unwrap().json().await.unwrap();
    assert_eq!(rsv["maxCost"], 0.00108);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(gateway::reservations::expire(&gw.state).await.unwrap(), 1);
    let list: Value = gw.http.get(gw.url("/api/llm/reservations")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0]["status"], "released");
    assert_eq!(list["data"][0]["charged"], 0.00108);
    assert_eq!(gw.balance(&format!("user:{uid}")).await, 1_000_000 - 1_080);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_payout_webhook_connector_retries_and_reports() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    // A payout service that fails twice, then accepts; it records what it got.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen: Arc<parking_lot::Mutex<Vec<(String, String, String)>>> = Arc::default();
    let (c, s) = (calls.clone(), seen.clone());
    let service = axum::Router::new().route(
        "/payouts",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (c, s) = (c.clone(), s.clone());
            async move {
                let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                s.lock().push((header("x-signature"), header("idempotency-key"), body));
                if c.fetch_add(1, Ordering::SeqCst) < 2 { axum::http::StatusCode::SERVICE_UNAVAILABLE } else { axum::http::StatusCode::OK }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_url = format!("http://{}/payouts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, service).await.unwrap() });
    let gw = Gateway::start_with(|c| {
        c.payout_webhook_url = Some(service_url);
        c.payout_webhook_secret = Some(Secret::new("payout-secret"));
    })
    .await;
    let (id, pkey) = provider_with_earnings(&gw, 10).await;
    let body = json!({"providerId": id, "amount": 8.0, "method": {"type": "bank_transfer", "iban": "DE89370400440532013000"}});
    let w: Value = gw.http.post(gw.url("/api/payment/withdraw")).bearer_auth(&pkey).json(&body).send().await.unwrap().json().await.unwrap();
    let wid = w["id"].as_str().unwrap().to_owned();
    let mut status = String::new();
    for _ in 0..100 {
        let list: Value = gw.http.get(gw.url(&format!("/api/payment/withdrawals/{id}"))).bearer_auth(&pkey).send().await.unwrap().json().await.unwrap();
        status = list["data"][0]["status"].as_str().unwrap().to_owned();
        if status == "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "processing", "accepted on the third try");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    {
        let seen = seen.lock();
        assert!(seen.iter().all(|(sig, idem, body)| {
            *idem == wid && *sig == gateway::payout_connector::sign("payout-secret", body.as_bytes())
        }), "every delivery is signed and carries the idempotency key");
        assert!(seen[0].2.contains("DE89370400440532013000"));
    }
    // The service reports the outcome, signed; a replay changes nothing; a forgery is refused.
    let report = json!({"withdrawalId": wid, "status": "paid"}).to_string();
    let send = |sig: String| gw.http.post(gw.url("/api/payment/payout-webhook")).header("content-type", "application/json").header("x-signature", sig).body(report.clone()).send();
    assert_eq!(send("sha256=abcd".into()).await.unwrap().status(), 401);
    for _ in 0..2 {
        let v: Value = send(gateway::payout_connector::sign("payout-secret", report.as_bytes())).await.unwrap().json().await.unwrap();
        assert_eq!(v["status"], "paid");
    }
    assert_eq!(gw.balance("platform:payouts").await, 0);
    assert_eq!(gw.balance(&format!("provider:{id}")).await, 2_000_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_volume_discount_applies_past_the_tier() {
    let gw = Gateway::start_with(|c| c.volume_discounts = vec![gateway::config::VolumeDiscount { monthly_tokens: 10, discount_bp: 5_000 }]).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (key, uid) = gw.create_unfunded_key("premium").await;
    gw.credit(&uid, 1_000_000).await;
    let account = format!("user:{uid}");
    let mut costs = Vec::new();
    for _ in 0..3 {
        let before = gw.balance(&account).await;
        let v: Value = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.json().await.unwrap();
        costs.push(before - gw.balance(&account).await);
        assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, *costs.last().unwrap());
    }
    assert_eq!(costs, vec![HI_COST, HI_COST, HI_COST / 2], "7, 14 tokens so far: full price; from 10 tokens on: 50% off");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ledger_overreported_usage_is_not_billed_and_flagged() {
    let gw = Gateway::start().await;
    let liar = spawn_mock(MockConfig { overreport: Some(100), ..MockConfig::default() }).await.unwrap();
    let (provider, _) = gw.add_provider(&liar, "mock-model", None, &["standard"]).await;
    let key = gw.create_key("premium").await;
    let v: Value = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 6, "our own count of delivered tokens wins");
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, HI_COST);
    let providers: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(providers["data"][0]["id"], provider.as_str());
    assert_eq!(providers["data"][0]["usageFlags"], 1);
    // The user sees their own balance and history.
    let b: Value = gw.http.get(gw.url("/api/llm/balance")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert!((b["balance"].as_f64().unwrap() - (10.0 - HI_COST as f64 / 1e6)).abs() < 1e-9, "{b}");
    let h: Value = gw.http.get(gw.url("/api/llm/transactions")).bearer_auth(&key).send().await.unwrap().json().await.unwrap();
    assert_eq!(h["data"].as_array().unwrap().len(), 2, "the credit and one request");
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_rate_limits_per_key_with_openai_headers() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let v: Value = gw.admin_post("/api/admin/keys", json!({"name": "rl", "tier": "free", "requestsPerMinute": 3, "tokensPerMinute": 100000})).await.json().await.unwrap();
    let key = v["key"].as_str().unwrap().to_owned();
    let body = json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 10});
    for i in 0..3u64 {
        let r = gw.chat(&key, body.clone()).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], (2 - i).to_string().as_str());
        assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100000");
        assert!(r.headers().get("x-ratelimit-reset-requests").is_some());
    }
    let r = gw.chat(&key, body.clone()).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let retry_ms: u64 = r.headers()["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((19_000..=20_000).contains(&retry_ms), "one request frees every 20 s: {retry_ms}");
    assert_eq!(retry, retry_ms.div_ceil(1000));
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(mock.request_count(), 3, "a limited request never reaches a provider");

    // Tokens: the estimate (prompt bytes / 4 + max_tokens) is charged up front and corrected after.
    let v: Value = gw.admin_post("/api/admin/keys", json!({"name": "tl", "tier": "free", "tokensPerMinute": 3000})).await.json().await.unwrap();
    let tkey = v["key"].as_str().unwrap().to_owned();
    let big = json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 2000});
    let r = gw.chat(&tkey, big.clone()).await;
    assert_eq!(r.status(), 200);
    let after_first: u64 = r.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
    assert!(after_first < 1000, "the estimate was charged: {after_first}");
    // The refund of the unused estimate lands right after the response.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = gw.chat(&tkey, big.clone()).await;
    assert_eq!(r.status(), 200, "the first request's unused tokens were given back");
    let r = gw.chat(&tkey, json!({"model": "mock-model", "messages": user("hi"), "max_tokens": 5000})).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "tokens");
}

#[tokio::test]
async fn inproc_registration_is_limited_per_ip() {
    let gw = Gateway::start_with(|c| c.ip_requests_per_minute = 2).await;
    let body = json!({"capabilities": {"models": ["m"], "maxConcurrentStreams": 1}, "pricing": {"perToken": 0.0}, "baseUrl": "http://127.0.0.1:9"});
    for expected in [201, 201, 429] {
        let r = gw.http.post(gw.url("/api/gpu/register")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), expected);
    }
    assert_eq!(gw.http.get(gw.url("/health")).send().await.unwrap().status(), 200, "health is never limited");
}

/// Chaos: one slow, one failing a third of its requests, one dying mid-stream, one
/// over-reporting usage, and one healthy provider serve the same model. Routing samples
/// at random, so the test seeds it (`routing_seed`; `GS_ROUTING_SEED` tries another):
/// the same seed routes the same way, instead of a coin toss near the bounds.
#[tokio::test]
async fn inproc_chaos_traffic_shifts_to_the_healthy_provider() {
    let seed = std::env::var("GS_ROUTING_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_206);
    let gw = Gateway::start_with(|c| {
        c.routing_seed = Some(seed);
        // Active health checks would add timing to the routing inputs.
        c.health_check_secs = 0;
    })
    .await;
    let slow = spawn_mock(MockConfig { first_chunk_delay: Duration::from_millis(400), ..MockConfig::default() }).await.unwrap();
    let flaky = spawn_mock(MockConfig { fail_every: Some(3), ..MockConfig::default() }).await.unwrap();
    let dying = spawn_mock(MockConfig { die_mid_stream: true, ..MockConfig::default() }).await.unwrap();
    let liar = spawn_mock(MockConfig { overreport: Some(100), ..MockConfig::default() }).await.unwrap();
    let healthy = spawn_mock(MockConfig::default()).await.unwrap();
    for m in [&slow, &flaky, &dying, &liar, &healthy] {
        gw.add_provider(m, "mock-model", None, &["standard"]).await;
    }
    let key = gw.create_key("premium").await;
    let mut errors_before_first_token = 0;
    let mut mid_stream_errors = 0;
    for _ in 0..80 {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "stream": true, "max_tokens": 20})).await;
        if r.status() != 200 {
            errors_before_first_token += 1;
            continue;
        }
        let body = r.text().await.unwrap();
        if body.contains("\"error\"") {
            mid_stream_errors += 1;
        }
    }
    assert_eq!(errors_before_first_token, 0, "no client sees an error before the first token while a healthy provider exists");
    let counts: Vec<usize> = [&slow, &flaky, &dying, &liar, &healthy].iter().map(|m| m.request_count()).collect();
    eprintln!("seed {seed}: requests per provider (slow, flaky, dying, liar, healthy): {counts:?}; mid-stream errors: {mid_stream_errors}");
    // Traffic shifts away: each bad provider gets only a handful of the 80 requests.
    for (name, n) in ["slow", "flaky", "dying", "liar"].iter().zip(&counts) {
        assert!(*n <= 12, "{name} still got {n} of 80 requests");
    }
    assert!(counts[4] >= 40, "the healthy provider carries the traffic: {counts:?}");
    assert!(mid_stream_errors <= counts[2], "only the dying provider's streams broke");
    // Billing matches delivered tokens: the liar's reports were not billed.
    let flagged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_records WHERE usage_source = 'gateway_flagged'").fetch_one(&gw.state.store.pool).await.unwrap();
    assert_eq!(usize::try_from(flagged).unwrap(), counts[3], "every over-report was caught");
    let user_acct: String = sqlx::query_scalar("SELECT id FROM accounts WHERE kind = 'user'").fetch_one(&gw.state.store.pool).await.unwrap();
    wait_until_no_holds(&gw, &user_acct).await;
    gw.ledger_is_clean().await;
}

/// One provider's usage report against the gateway's count of the mock's reply, "The
/// capital of France is Paris.": 7 tokens with the default model's tokenizer (The,
/// Ġcapital, Ġof, ĠFrance, Ġis, ĠParis, .), 6 content chunks without one.
struct UsageCase {
    model: &'static str,
    /// Whether the gateway has the model's tokenizer.
    tokenizer: bool,
    /// The provider's `completion_tokens` (`None`: no usage chunk).
    reported: Option<usize>,
    /// What is billed, and the usage source recorded.
    billed: u64,
    source: &'static str,
}

const USAGE_CASES: [UsageCase; 9] = [
    // Honest providers are billed their own count, also when it differs from ours by
    // an end-of-sequence token or so.
    UsageCase { model: "tok-exact", tokenizer: true, reported: Some(7), billed: 7, source: "provider" },
    UsageCase { model: "tok-with-eos", tokenizer: true, reported: Some(8), billed: 8, source: "provider" },
    UsageCase { model: "tok-one-under", tokenizer: true, reported: Some(6), billed: 6, source: "provider" },
    // Over-reporting that content chunks cannot catch (≤ 4 per chunk + 16) is caught by
    // the tokenizer and billed on its count.
    UsageCase { model: "tok-double", tokenizer: true, reported: Some(14), billed: 7, source: "gateway_flagged" },
    UsageCase { model: "tok-chunk-max", tokenizer: true, reported: Some(40), billed: 7, source: "gateway_flagged" },
    // Without a usage chunk the gateway's count is billed.
    UsageCase { model: "tok-no-usage", tokenizer: true, reported: None, billed: 7, source: "gateway" },
    UsageCase { model: "plain-no-usage", tokenizer: false, reported: None, billed: 6, source: "gateway" },
    // Without a tokenizer the chunk count is the (looser) fallback.
    UsageCase { model: "plain-double", tokenizer: false, reported: Some(14), billed: 14, source: "provider" },
    UsageCase { model: "plain-over-max", tokenizer: false, reported: Some(41), billed: 6, source: "gateway_flagged" },
];

#[tokio::test]
async fn inproc_usage_is_checked_against_the_models_tokenizer() {
    let model_path = crate::real_worker::default_model_path().await;
    let gw = Gateway::start_with(|c| {
        for case in USAGE_CASES.iter().filter(|c| c.tokenizer) {
            c.tokenizers.insert(case.model.to_owned(), model_path.clone());
        }
    })
    .await;
    let key = gw.create_key("premium").await;
    let mut providers = HashMap::new();
    for case in &USAGE_CASES {
        let config = MockConfig {
            models: vec![case.model.to_owned()],
            completion_tokens: case.reported,
            omit_usage: case.reported.is_none(),
            ..MockConfig::default()
        };
        let mock = spawn_mock(config).await.unwrap();
        let (provider, _) = gw.add_provider(&mock, case.model, None, &["standard"]).await;
        providers.insert(provider, case);
        let r = gw.chat(&key, json!({"model": case.model, "messages": user("What is the capital of France?")})).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
        assert_eq!(v["usage"]["completion_tokens"], case.billed, "{}: billed completion tokens", case.model);
    }
    let rows: Vec<(String, String, i64)> = sqlx::query("SELECT model, usage_source, completion_tokens FROM usage_records")
        .fetch_all(&gw.state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("model"), r.get("usage_source"), r.get("completion_tokens")))
        .collect();
    assert_eq!(rows.len(), USAGE_CASES.len());
    for (model, source, tokens) in &rows {
        let case = USAGE_CASES.iter().find(|c| c.model == model).unwrap();
        assert_eq!((source.as_str(), u64::try_from(*tokens).unwrap()), (case.source, case.billed), "{model}");
    }
    // The admin sees each flag, and a flagged provider's honesty (and so its score) drops.
    let listed: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    for p in listed["data"].as_array().unwrap() {
        let case = providers[p["id"].as_str().unwrap()];
        let flagged = case.source == "gateway_flagged";
        assert_eq!(p["usageFlags"], u64::from(flagged), "{}", case.model);
        let honesty = p["health"]["honesty"].as_f64().unwrap();
        // A request without a usage report says nothing about honesty.
        assert_eq!(honesty < 1.0, flagged, "{}: honesty {honesty}", case.model);
    }
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_a_tokenizer_that_cannot_be_loaded_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(fresh_database(&dir).await.0);
    config.tokenizers.insert("mock-model".to_owned(), dir.path().join("missing.gguf"));
    let store = Store::connect(&config.database_url).await.unwrap();
    let err = Running::start_with_store(config, store).await.err().unwrap().to_string();
    assert!(err.contains(r#"`tokenizers."mock-model"`"#) && err.contains("missing.gguf"), "{err}");
}

#[tokio::test]
async fn inproc_repeated_client_request_ids_are_each_billed() {
    let (gw, _mock, key) = setup().await;
    for _ in 0..3 {
        let r = gw.http.post(gw.url("/v1/chat/completions")).bearer_auth(&key).header("x-request-id", "same-id")
            .json(&json!({"model": "mock-model", "messages": user("hi")})).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let state = gw.shutdown().await;
    let rows = usage_rows(&state).await;
    assert_eq!(rows.len(), 3, "one usage record per request even when the client repeats its id");
    assert!(rows.iter().all(|r| r.0 == "ok"));
}

#[tokio::test]
async fn inproc_quality_levels_custom_fallback_and_adaptive() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard", "low"]).await;
    let key = gw.create_key("premium").await;
    // A custom level: served on standard streams with its own parameters and price.
    let level = json!({"name": "turbo", "multiplier": 1.0, "latencyMultiplier": 0.5, "costMultiplier": 3.0, "maxTokens": 64});
    let r = gw.admin_post("/api/admin/quality-levels", level.clone()).await;
    assert_eq!(r.status(), 201);
    assert_eq!(gw.admin_post("/api/admin/quality-levels", level).await.status(), 409);
    assert_eq!(gw.admin_post("/api/admin/quality-levels", json!({"name": "high", "multiplier": 1.0, "latencyMultiplier": 1.0, "costMultiplier": 1.0, "maxTokens": 1})).await.status(), 409);
    assert_eq!(gw.admin_post("/api/admin/quality-levels", json!({"name": "x", "multiplier": -1.0, "latencyMultiplier": 1.0, "costMultiplier": 1.0, "maxTokens": 1})).await.status(), 400);
    let levels: Value = gw.http.get(gw.url("/api/admin/quality-levels")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(levels["data"].as_array().unwrap().len(), 5);
    let r = gw.chat(&key, json!({"model": "mock-model:turbo", "messages": user("hi"), "max_tokens": 1000})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quality-served"], "turbo");
    let v: Value = r.json().await.unwrap();
    assert_eq!(mock.last_body().unwrap()["max_tokens"], 64, "the level's cap");
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, 3 * HI_COST, "billed at 3.0x");
    // No provider streams `high`: refused unless the request allows a fallback.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "high"})).await;
    assert_eq!(r.status(), 503);
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": "high", "quality_fallback": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quality-served"], "standard", "the next tier down that has a provider");
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["usage"]["cost"].as_f64().unwrap() * 1e6).round() as i64, HI_COST, "billed at the served tier");
    // Adaptive: the highest tier whose expected latency fits; only standard and low run here.
    let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "max_latency_ms": 10000})).await;
    assert_eq!(r.headers()["x-quality-served"], "standard");
    // A custom level survives a restart of the level cache (it is persisted).
    gw.state.qualities.reload().await.unwrap();
    assert!(gw.state.qualities.get("turbo").is_some());
}

/// Precision per tier (DESIGN.md: low and standard allow reduced precision, high and
/// ultra need full): what providers are asked for, who may serve, what registration
/// accepts.
#[tokio::test]
async fn inproc_quality_levels_precision_reaches_providers_and_routes() {
    let gw = Gateway::start().await;
    let key = gw.create_key("premium").await;
    let all = ["low", "standard", "high", "ultra"];
    // Registration: an unknown precision names the entry, an empty list the field.
    let register = |precisions: Value| {
        gw.http.post(gw.url("/api/gpu/register")).json(&json!({"capabilities": {"models": ["m"], "maxConcurrentStreams": 2, "precisions": precisions},
            "pricing": {"perToken": 0.000002}, "baseUrl": "http://127.0.0.1:9"})).send()
    };
    for (precisions, param) in [(json!(["full", "half"]), "capabilities.precisions[1]"), (json!([]), "capabilities.precisions"), (json!("full"), "capabilities.precisions")] {
        let r = register(precisions.clone()).await.unwrap();
        assert_eq!(r.status(), 400, "{precisions}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["param"], param, "{precisions}: {e}");
    }
    // A provider that makes no claim serves full precision (its model as loaded), so
    // it serves every tier; each tier's precision reaches it in the body.
    let plain = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&plain, "mock-model", None, &all).await;
    for (quality, precision) in [("low", "reduced"), ("standard", "reduced"), ("high", "full"), ("ultra", "full")] {
        let r = gw.chat(&key, json!({"model": "mock-model", "messages": user("hi"), "quality": quality})).await;
        assert_eq!(r.status(), 200, "{quality}");
        assert_eq!(plain.last_body().unwrap()["precision"], precision, "{quality}");
    }
    // The levels list says what each level requires; a custom level follows its multiplier.
    for (name, multiplier) in [("eco", 1.0), ("turbo", 2.0)] {
        let level = json!({"name": name, "multiplier": multiplier, "latencyMultiplier": 1.0, "costMultiplier": 1.0, "maxTokens": 64});
        assert_eq!(gw.admin_post("/api/admin/quality-levels", level).await.status(), 201);
    }
    let levels: Value = gw.http.get(gw.url("/api/admin/quality-levels")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let listed: Vec<(&str, &str)> =
        levels["data"].as_array().unwrap().iter().map(|l| (l["name"].as_str().unwrap(), l["precision"].as_str().unwrap())).collect();
    assert_eq!(listed, [("low", "reduced"), ("standard", "reduced"), ("high", "full"), ("ultra", "full"), ("eco", "reduced"), ("turbo", "full")]);

    // A second model served only at reduced precision, on line at every tier.
    let reduced = spawn_mock(MockConfig { models: vec!["fast-model".into()], ..MockConfig::default() }).await.unwrap();
    let caps = json!({"models": ["fast-model"], "maxConcurrentStreams": 64, "precisions": ["reduced"]});
    let (reduced_id, _) = gw.add_provider_caps(&reduced, caps, &all).await;
    let providers: Value = gw.http.get(gw.url("/api/admin/providers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let precisions_of = |id: &str| providers["data"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap()["capabilities"]["precisions"].clone();
    assert_eq!(precisions_of(&reduced_id), json!(["reduced"]));
    let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": "low"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(reduced.last_body().unwrap()["precision"], "reduced");
    // Full-precision levels (built-in or custom) have no provider for it...
    for quality in ["high", "ultra", "turbo"] {
        let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": quality})).await;
        assert_eq!(r.status(), 503, "{quality}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "no_provider_available");
    }
    assert_eq!(reduced.request_count(), 1, "a reduced-precision provider never gets a full-precision request");
    // ...unless the request allows a fallback: the next tier down that allows reduced precision.
    let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": "ultra", "quality_fallback": true})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-quality-served"], "standard");
    assert_eq!(reduced.last_body().unwrap()["precision"], "reduced");
    assert_eq!(reduced.last_body().unwrap()["priority"], 1, "standard's parameters, not ultra's");

    // With a full-precision provider beside it, every ultra request goes there.
    let full = spawn_mock(MockConfig { models: vec!["fast-model".into()], ..MockConfig::default() }).await.unwrap();
    let caps = json!({"models": ["fast-model"], "maxConcurrentStreams": 64, "precisions": ["full", "reduced"]});
    gw.add_provider_caps(&full, caps, &all).await;
    for _ in 0..10 {
        let r = gw.chat(&key, json!({"model": "fast-model", "messages": user("hi"), "quality": "ultra"})).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(full.request_count(), 10);
    assert!(full.bodies.lock().iter().all(|b| b["precision"] == "full"));
    assert!(reduced.bodies.lock().iter().all(|b| b["precision"] == "reduced"));
    assert_eq!(reduced.request_count(), 2);
}

/// Parses Prometheus text format: `name{labels} value` → (name with labels, value);
/// every line must be a comment or a well-formed sample.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            let kind = rest.trim_start();
            assert!(kind.starts_with("HELP ") || kind.starts_with("TYPE "), "bad comment line: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(series[..name_end].chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad name: {line}");
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn inproc_metrics_after_traffic() {
    let (gw, _mock, key) = setup().await;
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, json!({"model": "mock-model", "messages": user("hi")})).await.status(), 200);
    }
    assert_eq!(gw.chat(&key, json!({"model": "nope", "messages": user("hi")})).await.status(), 404);
    let r = gw.http.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let m = parse_prometheus(&r.text().await.unwrap());
    assert_eq!(m["gs_http_requests_total{path=\"/v1/chat/completions\",status=\"200\"}"], 3.0);
    assert_eq!(m["gs_http_requests_total{path=\"/v1/chat/completions\",status=\"404\"}"], 1.0);
    assert_eq!(m["gs_completions_total{status=\"ok\"}"], 3.0);
    assert_eq!(m["gs_tokens_total{kind=\"completion\"}"], 18.0);
    assert_eq!(m["gs_time_to_first_token_seconds_count"], 3.0);
    assert!(m["gs_http_request_duration_seconds_count"] >= 4.0);
    assert!((m["gs_ledger_charged_usd_total"] - 3.0 * HI_COST as f64 / 1e6).abs() < 1e-12);
    assert_eq!(m["gs_providers_online"], 1.0);
    assert_eq!(m["gs_active_streams"], 0.0);
    let scores: Vec<f64> = m.iter().filter(|(k, _)| k.starts_with("gs_provider_score{")).map(|(_, v)| *v).collect();
    assert_eq!(scores.len(), 1);
    assert!(scores[0] > 0.5 && scores[0] <= 1.0);
}

// --- ads ---------------------------------------------------------------------------------

pub(crate) const TECH_QUESTION: &str = "How do I fix this Rust compiler error in my Python and Rust code?";

/// An advertiser with `credit` µUSD and one campaign on `technology`; returns
/// `(advertiser id, campaign id)`.
pub(crate) async fn ad_campaign(gw: &Gateway, credit: i64, campaign: Value) -> (String, String) {
    let r = gw.admin_post("/api/admin/advertisers", json!({"name": "Acme <b>Tools</b>"})).await;
    assert_eq!(r.status(), 201);
    let adv: Value = r.json().await.unwrap();
    let adv_id = adv["id"].as_str().unwrap().to_owned();
    let r = gw.admin_post(&format!("/api/admin/advertisers/{adv_id}/credit"), json!({"amountMicros": credit})).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let credited: Value = r.json().await.unwrap();
    let usd = credit as f64 / 1e6;
    assert_eq!(
        credited["balance"],
        json!({"posted": usd, "held": 0.0, "available": usd, "postedMicros": credit, "heldMicros": 0, "availableMicros": credit})
    );
    let list: Value = gw.http.get(gw.url("/api/admin/advertisers")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    let listed = list["data"].as_array().unwrap().iter().find(|a| a["id"] == adv_id.as_str()).unwrap();
    assert_eq!(listed["balance"]["availableMicros"], credit);
    assert_eq!(listed["name"], "Acme <b>Tools</b>");
    let mut body = json!({
        "advertiserId": adv_id, "name": "Rust IDE", "categories": ["technology"],
        "title": "FastIDE", "text": "The editor for Rust developers.", "url": "https://fastide.example/?src=gs",
        "cpmBidMicros": 2_000_000, "dailyBudgetMicros": 1_000_000, "totalBudgetMicros": 5_000_000
    });
    for (k, v) in campaign.as_object().unwrap() {
        body[k] = v.clone();
    }
    let r = gw.admin_post("/api/admin/campaigns", body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let c: Value = r.json().await.unwrap();
    (adv_id, c["id"].as_str().unwrap().to_owned())
}

pub(crate) async fn impressions(gw: &Gateway) -> Vec<(String, i64, Option<i64>, Option<String>)> {
    sqlx::query("SELECT id, charged, clicked_at, provider_id FROM ad_impressions ORDER BY created_at")
        .fetch_all(&gw.state.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("id"), r.get("charged"), r.get("clicked_at"), r.get("provider_id")))
        .collect()
}

pub(crate) async fn wait_impressions(gw: &Gateway, n: usize) -> Vec<(String, i64, Option<i64>, Option<String>)> {
    for _ in 0..300 {
        let rows = impressions(gw).await;
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {n} ad impressions");
}

fn streamed_content(body: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    for e in sse_events(body) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        chunks.push(v);
    }
    (text, chunks)
}

#[tokio::test]
async fn inproc_ads_cpm_impression_and_click_move_money_exactly() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    let (provider, _) = gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (adv, campaign) = ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;

    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "stream": true})).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"));
    let (text, chunks) = streamed_content(&body);
    assert!(text.starts_with("The capital of France is Paris.\n\n---\n[Sponsored] FastIDE: The editor for Rust developers. "), "{text}");
    // The ad comes before the chunk that finishes the answer.
    let ad_at = chunks.iter().position(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| t.contains("[Sponsored]"))).unwrap();
    let finish_at = chunks.iter().position(|c| c["choices"][0]["finish_reason"] == "stop").unwrap();
    assert_eq!(ad_at + 1, finish_at);

    let rows = wait_impressions(&gw, 1).await;
    let (imp, charged, clicked, served_by) = rows[0].clone();
    assert!(text.trim_end().ends_with(&format!("/r/{imp}")), "{text}");
    // Alone in the auction: the reserve price, $0.10 CPM = 100 µUSD per impression.
    assert_eq!(charged, 100);
    assert_eq!(clicked, None);
    assert_eq!(served_by.as_deref(), Some(provider.as_str()));
    // 20% to the provider that carried the ad, the rest to the platform.
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 100);
    let provider_tokens: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id WHERE l.account_id = $1 AND e.kind = 'ad_impression'",
    )
    .bind(format!("provider:{provider}"))
    .fetch_one(&gw.state.store.pool)
    .await
    .unwrap();
    assert_eq!(provider_tokens, 20);
    let ad_revenue: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.amount), 0) AS BIGINT) FROM ledger_lines l JOIN ledger_entries e ON e.id = l.entry_id WHERE l.account_id = 'platform:ad_revenue' AND e.kind = 'ad_impression'",
    )
    .fetch_one(&gw.state.store.pool)
    .await
    .unwrap();
    assert_eq!(ad_revenue, 80);

    // The click redirects, is recorded once and costs a CPM campaign nothing more.
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for _ in 0..2 {
        let r = no_redirect.get(gw.url(&format!("/r/{imp}"))).send().await.unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], "https://fastide.example/?src=gs");
    }
    let rows = impressions(&gw).await;
    assert!(rows[0].2.is_some());
    assert_eq!(rows[0].1, 100);
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 100);
    let r = no_redirect.get(gw.url("/r/imp_unknown")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let c: Value = gw.http.get(gw.url(&format!("/api/admin/campaigns/{campaign}"))).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["stats"]["impressions"], 1);
    assert_eq!(c["stats"]["clicks"], 1);
    assert_eq!(c["stats"]["spendMicros"], 100);
    assert_eq!(c["stats"]["spend"], 0.0001);
    let report: Value = gw.http.get(gw.url("/api/analytics/ads")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(report["impressions"], 1);
    assert_eq!(report["clicks"], 1);
    assert_eq!(report["revenueMicros"], 100);
    assert_eq!(report["revenue"], 0.0001);
    assert_eq!(report["byCategory"][0]["category"], "technology");
    assert_eq!(report["freeTier"]["adRevenueMicros"], 80);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_cpc_charges_on_the_first_click_only() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    // CPC only: $0.05 per click at the 1% prior CTR is a $0.50 eCPM; alone, it pays the
    // $0.10 reserve: 100_000 / (1000 × 0.01) = 10_000 µUSD per click.
    let (adv, _) = ad_campaign(&gw, 1_000_000, json!({"cpmBidMicros": 0, "cpcBidMicros": 50_000})).await;
    let free = gw.create_key("free").await;
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION)})).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("The capital of France is Paris.\n\n---\n[Sponsored] FastIDE"), "{content}");
    let rows = wait_impressions(&gw, 1).await;
    assert_eq!(rows[0].1, 0, "a CPC impression costs nothing until clicked");
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000);
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for _ in 0..3 {
        let r = no_redirect.get(gw.url(&format!("/r/{}", rows[0].0))).send().await.unwrap();
        assert_eq!(r.status(), 302);
    }
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 10_000);
    assert_eq!(impressions(&gw).await[0].1, 10_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_never_for_premium_structured_tools_or_sensitive_topics() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let premium = gw.create_key("premium").await;
    let reply = "The capital of France is Paris.";
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let cases = [
        ("premium", premium.as_str(), json!({})),
        ("json mode", free.as_str(), json!({"response_format": {"type": "json_object"}})),
        ("json schema", free.as_str(), json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})),
        ("tools", free.as_str(), json!({"tools": tool})),
        ("n > 1", free.as_str(), json!({"n": 2})),
        ("politics", free.as_str(), json!({"messages": user("Rust code for the election ballot counting software")})),
        ("self harm", free.as_str(), json!({"messages": user("My Rust code is broken and I want to kill myself")})),
        ("off topic", free.as_str(), json!({"messages": user("Hello there, how are you?")})),
        ("blocked category", free.as_str(), json!({"ad_preferences": {"blocked_categories": ["technology"]}})),
        ("other category wanted", free.as_str(), json!({"ad_preferences": {"categories": ["finance"]}})),
    ];
    for (name, key, extra) in cases {
        for stream in [false, true] {
            let mut body = json!({"model": "mock-model", "messages": user(TECH_QUESTION), "stream": stream});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r = gw.chat(key, body).await;
            assert_eq!(r.status(), 200, "{name}");
            let text = r.text().await.unwrap();
            assert!(!text.contains("Sponsored"), "{name} (stream {stream}) carried an ad: {text}");
            if stream {
                assert_eq!(streamed_content(&text).0, reply, "{name}");
            }
        }
    }
    // A free key with nothing excluded does get one (the cases above are not vacuous).
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION)})).await;
    assert!(r.text().await.unwrap().contains("[Sponsored] FastIDE"));
    // An unknown placement is the client's error.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"placement": "banner"}})).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "ad_preferences.placement");
    wait_impressions(&gw, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(impressions(&gw).await.len(), 1);
}

#[tokio::test]
async fn inproc_ads_metadata_placement_leaves_content_untouched() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let prefs = json!({"placement": "metadata"});
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "stream": true, "ad_preferences": prefs})).await;
    let body = r.text().await.unwrap();
    let (text, chunks) = streamed_content(&body);
    assert_eq!(text, "The capital of France is Paris.");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["ad"]["title"], "FastIDE");
    assert_eq!(last["ad"]["label"], "Sponsored");
    assert_eq!(last["ad"]["category"], "technology");
    assert!(last["ad"]["click_url"].as_str().unwrap().contains("/r/imp_"));
    // Non-streaming: an `ad` object beside `choices`.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": prefs})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    assert_eq!(v["ad"]["title"], "FastIDE");
    wait_impressions(&gw, 2).await;
}

#[tokio::test]
async fn inproc_ads_are_stripped_from_incoming_assistant_turns() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION)})).await;
    let v: Value = r.json().await.unwrap();
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(answer.contains("[Sponsored]"));
    let premium = gw.create_key("premium").await;
    for key in [&free, &premium] {
        let messages = json!([
            {"role": "user", "content": TECH_QUESTION},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And in Python?"},
        ]);
        let r = gw.chat(key, json!({"model": "mock-model", "messages": messages})).await;
        assert_eq!(r.status(), 200);
        let seen = mock.last_body().unwrap();
        assert_eq!(seen["messages"][1]["content"], "The capital of France is Paris.");
        assert!(!seen.to_string().contains("Sponsored"), "{seen}");
    }
}

#[tokio::test]
async fn inproc_ads_no_impression_when_the_client_leaves_or_the_stream_fails() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (adv, _) = ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    // The client reads the first token of a slow stream and hangs up.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(&format!("{TECH_QUESTION} [slow]")), "stream": true})).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(body);
    // The provider fails after two tokens: an error event, no ad.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(&format!("{TECH_QUESTION} [fail-mid]")), "stream": true})).await;
    let text = r.text().await.unwrap();
    assert!(text.contains("\"error\""), "{text}");
    assert!(!text.contains("Sponsored"), "{text}");
    // Both requests are settled (usage rows) and neither delivered an ad.
    for _ in 0..300 {
        if gw.usage_rows().await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.usage_rows().await.len(), 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(impressions(&gw).await.is_empty());
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_frequency_cap_budget_and_campaign_admin() {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let (adv, campaign) = ad_campaign(&gw, 1_000_000, json!({"frequencyCap": 1})).await;
    let free = gw.create_key("free").await;
    let ask = json!({"model": "mock-model", "messages": user(TECH_QUESTION)});
    let first = gw.chat(&free, ask.clone()).await.text().await.unwrap();
    assert!(first.contains("[Sponsored]"));
    wait_impressions(&gw, 1).await;
    let second = gw.chat(&free, ask.clone()).await.text().await.unwrap();
    assert!(!second.contains("[Sponsored]"), "frequency cap of 1 per user per day");
    // Another user is not capped.
    let other = gw.create_key("free").await;
    assert!(gw.chat(&other, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    wait_impressions(&gw, 2).await;

    // Paused: no more ads; validation errors are 400s naming the field.
    let patch = |body: Value| {
        let gw = &gw;
        let campaign = campaign.clone();
        async move { gw.http.patch(gw.url(&format!("/api/admin/campaigns/{campaign}"))).bearer_auth(ADMIN).json(&body).send().await.unwrap() }
    };
    let r = patch(json!({"status": "paused"})).await;
    assert_eq!(r.status(), 200);
    let third = gw.create_key("free").await;
    assert!(!gw.chat(&third, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    for (body, param) in [
        (json!({"categories": ["cars"]}), "categories"),
        (json!({"url": "javascript:alert(1)"}), "url"),
        (json!({"cpmBid": 0, "cpcBid": 0}), "cpmBid"),
        (json!({"startsAt": 2000, "endsAt": 1000}), "endsAt"),
        (json!({"status": "deleted"}), "status"),
        (json!({"title": ""}), "title"),
    ] {
        let r = patch(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}");
    }
    let r = patch(json!({"nope": 1})).await;
    assert_eq!(r.status(), 400);
    // One money convention: USD in the named field, micro-USD in its twin. A micro-USD
    // amount sent in a USD field, the two disagreeing, or more than six decimals are
    // refused naming the field; nothing changes.
    for (body, param) in [
        (json!({"dailyBudget": 1_000_000_000}), "dailyBudget"),
        (json!({"cpmBid": 2_000_000}), "cpmBid"),
        (json!({"totalBudget": 5, "totalBudgetMicros": 4_000_000}), "totalBudget"),
        (json!({"cpcBid": 0.000_000_1}), "cpcBid"),
        (json!({"dailyBudgetMicros": -1}), "dailyBudgetMicros"),
    ] {
        let r = patch(body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
    }
    let r = patch(json!({"dailyBudget": 0.75, "cpmBidMicros": 2_000_000})).await;
    assert_eq!(r.status(), 200);
    let c: Value = r.json().await.unwrap();
    assert_eq!((c["dailyBudget"].clone(), c["dailyBudgetMicros"].clone()), (json!(0.75), json!(750_000)));
    assert_eq!((c["cpmBid"].clone(), c["cpmBidMicros"].clone()), (json!(2.0), json!(2_000_000)));
    let r = gw.admin_post(&format!("/api/admin/advertisers/{adv}/credit"), json!({"amount": 1_000_000_000})).await;
    assert_eq!(r.status(), 400, "a micro-USD credit sent as `amount` is refused, not taken as a billion dollars");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "amount");
    assert!(e["error"]["message"].as_str().unwrap().contains("amountMicros"), "{e}");
    let r = gw.http.patch(gw.url("/api/admin/campaigns/cmp_missing")).bearer_auth(ADMIN).json(&json!({"status": "active"})).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = gw.http.get(gw.url("/api/admin/campaigns")).bearer_auth(&free).send().await.unwrap();
    assert_eq!(r.status(), 401, "the admin API needs the admin key");

    // Active again, with a total budget that one more impression would overrun.
    let r = patch(json!({"status": "active", "frequencyCap": 0, "totalBudgetMicros": 250})).await;
    assert_eq!(r.status(), 200);
    let fourth = gw.create_key("free").await;
    assert!(!gw.chat(&fourth, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"), "200 of 250 spent; an impression may cost up to 2000");
    let list: Value = gw.http.get(gw.url("/api/admin/campaigns")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
    assert_eq!(list["data"][0]["stats"]["impressions"], 2);
    assert_eq!(gw.balance(&format!("advertiser:{adv}")).await, 1_000_000 - 200);
    gw.ledger_is_clean().await;
}

#[tokio::test]
async fn inproc_ads_preferences_per_key_opt_out_and_completions() {
    let gw = Gateway::start_with(|c| c.ads_free_opt_out = true).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let ask = json!({"model": "mock-model", "messages": user(TECH_QUESTION)});
    assert!(gw.chat(&free, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    // A key's standing preferences: technology blocked.
    let put = |prefs: Value| {
        let (gw, free) = (&gw, free.clone());
        async move { gw.http.put(gw.url("/api/llm/ad-preferences")).bearer_auth(free).json(&prefs).send().await.unwrap() }
    };
    let r = put(json!({"blocked_categories": ["technology"]})).await;
    assert_eq!(r.status(), 200);
    assert!(!gw.chat(&free, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    let r = put(json!({"blocked_categories": ["cars"]})).await;
    assert_eq!(r.status(), 400);
    let r = put(json!({})).await;
    assert_eq!(r.status(), 200);
    assert!(gw.chat(&free, ask.clone()).await.text().await.unwrap().contains("[Sponsored]"));
    // Opt-out is honoured where the gateway allows it for the free tier.
    let mut opt_out = ask.clone();
    opt_out["ad_preferences"] = json!({"opt_out": true});
    assert!(!gw.chat(&free, opt_out).await.text().await.unwrap().contains("[Sponsored]"));
    // The completions endpoint carries the ad in `text`.
    let r = gw
        .http
        .post(gw.url("/v1/completions"))
        .bearer_auth(&free)
        .json(&json!({"model": "mock-model", "prompt": TECH_QUESTION, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text: String = sse_events(&r.text().await.unwrap())
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert!(text.starts_with("The capital of France is Paris.\n\n---\n[Sponsored] FastIDE"), "{text}");
    wait_impressions(&gw, 3).await;
}

#[tokio::test]
async fn inproc_ads_opt_out_is_refused_on_the_free_tier_by_default_and_prompt_placement() {
    let gw = Gateway::start_with(|c| c.ads_prompt_placement = true).await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard"]).await;
    ad_campaign(&gw, 1_000_000, json!({})).await;
    let free = gw.create_key("free").await;
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"opt_out": true}})).await;
    assert!(r.text().await.unwrap().contains("[Sponsored]"), "free keys cannot opt out unless ads_free_opt_out");
    // The prompt placement: a labelled note in the system prompt, nothing in the answer.
    let r = gw.chat(&free, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"placement": "prompt"}})).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "The capital of France is Paris.");
    let seen = mock.last_body().unwrap();
    assert_eq!(seen["messages"][0]["role"], "system");
    let note = seen["messages"][0]["content"].as_str().unwrap();
    assert!(note.starts_with("Sponsored note") && note.contains("FastIDE"), "{note}");
    wait_impressions(&gw, 2).await;
    // Where the gateway does not allow it, asking for it is a 400.
    let gw2 = Gateway::start().await;
    gw2.add_provider(&mock, "mock-model", None, &["standard"]).await;
    let free2 = gw2.create_key("free").await;
    let r = gw2.chat(&free2, json!({"model": "mock-model", "messages": user(TECH_QUESTION), "ad_preferences": {"placement": "prompt"}})).await;
    assert_eq!(r.status(), 400);
}
