//! The in-process harness: the real gateway (`server::serve` over `app()`) on an
//! ephemeral port, in front of counted mock providers, on SQLite or PostgreSQL
//! (`GS_TEST_DB`). The suites that use it are split by concern: `openai_surface`,
//! `billing`, `routing`, `ads`, `responses`, `money`, `bounds` and `attacks`; every test
//! named `inproc_*` also runs on PostgreSQL.

use std::time::Duration;

use gateway::ops::config::{Config, Secret};
use gateway::ops::server::{self, Running};
use gateway::store::Store;
use gateway::state::AppState;
use serde_json::{json, Value};
use sqlx::Row;
use tests::{spawn_mock, MockConfig, MockProvider};
use tokio::sync::oneshot;

pub(crate) const ADMIN: &str = "admin-key-for-tests-0123";
pub(crate) const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One gateway with its own fresh database.
pub(crate) struct Gateway {
    pub(crate) base: String,
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
            let (url, schema) = fresh_postgres().await;
            (url, Some(schema))
        }
        Ok("sqlite") | Err(_) => (format!("sqlite://{}", dir.path().join("gw.db").display()), None),
        Ok(other) => panic!("GS_TEST_DB must be sqlite or postgres, not {other}"),
    }
}

/// A new schema in the PostgreSQL test database (whatever `GS_TEST_DB` says): its URL
/// and name.
pub(crate) async fn fresh_postgres() -> (String, String) {
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(PG_URL).await.expect("PostgreSQL at 127.0.0.1:5432 (scripts/test.sh starts it)");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&pool).await.expect("create schema");
    pool.close().await;
    (format!("{PG_URL}?options=-c%20search_path%3D{schema}"), schema)
}

pub(crate) fn test_config(url: String) -> Config {
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_listening(url, dir, listener, tweak).await
    }

    /// A gateway on `listener` (a test that must know its address before it starts:
    /// replicas that name each other).
    pub(crate) async fn start_listening(
        url: String,
        dir: tempfile::TempDir,
        listener: tokio::net::TcpListener,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = test_config(url);
        tweak(&mut config);
        let store = Store::connect(&config.database_url).await.unwrap();
        let running = Running::start_with_store(config, store).await.unwrap();
        let state = running.state.clone();
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
        let report = gateway::money::ledger::Ledger::new(self.state.store.clone()).check().await.unwrap();
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
    pub(crate) async fn add_provider_priced(&self, mock: &MockProvider, model: &str, per_token: f64) -> String {
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
    pub(crate) async fn shutdown(mut self) -> AppState {
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

pub(crate) async fn usage_rows(state: &AppState) -> Vec<(String, String, i64, i64)> {
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

pub(crate) async fn wait_for<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

pub(crate) async fn setup() -> (Gateway, MockProvider, String) {
    let gw = Gateway::start().await;
    let mock = spawn_mock(MockConfig::default()).await.unwrap();
    gw.add_provider(&mock, "mock-model", None, &["standard", "low", "ultra"]).await;
    let key = gw.create_key("premium").await;
    (gw, mock, key)
}

pub(crate) fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Parses an SSE body into its data payloads.
pub(crate) fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}
