//! Test support shared by the suites and the benchmark: a counted mock OpenAI-compatible
//! provider (a test double; it never ships in a product binary).
//!
//! The mock streams a fixed reply one word per chunk, honours `max_tokens`, reports
//! usage, and misbehaves on request: a `[fail-before]` user message gets a 500, a
//! `[fail-mid]` message dies after two tokens, `[idle]` sends one token and then holds
//! the stream open, `[slow]` waits 50 ms between tokens.

pub mod bench;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// The reply every request gets, one word per chunk.
pub const REPLY: [&str; 6] = ["The", " capital", " of", " France", " is", " Paris."];

#[derive(Clone, Default)]
pub struct MockConfig {
    /// Model ids served.
    pub models: Vec<String>,
    /// Every request fails with this status before streaming.
    pub fail_status: Option<u16>,
    /// Extra delay before the first chunk.
    pub first_chunk_delay: Duration,
    /// Leave out the usage chunk (as some servers do).
    pub omit_usage: bool,
    /// Report this many times the completion tokens really sent (a dishonest provider).
    pub overreport: Option<usize>,
    /// Report exactly this many completion tokens (instead of one per word sent).
    pub completion_tokens: Option<usize>,
    /// Fail every n-th request with a 500 before streaming (n = 3: a third of them).
    pub fail_every: Option<usize>,
    /// Die after two tokens on every request.
    pub die_mid_stream: bool,
}

#[derive(Clone)]
pub struct MockProvider {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub bodies: Arc<Mutex<Vec<Value>>>,
    /// Streams that are open right now, and the most that ever were at once.
    pub open_streams: Arc<AtomicUsize>,
    pub peak_streams: Arc<AtomicUsize>,
    pub cancelled: Arc<AtomicUsize>,
    /// Requests that arrived over HTTP/2 (h2c), so a test can tell how the gateway called.
    pub http2_requests: Arc<AtomicUsize>,
    /// `GET /health` calls (the gateways' active checks).
    pub health_checks: Arc<AtomicUsize>,
}

impl MockProvider {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn request_count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn last_body(&self) -> Option<Value> {
        self.bodies.lock().last().cloned()
    }
}

#[derive(Clone)]
struct Shared {
    config: MockConfig,
    provider: MockProvider,
}

pub async fn spawn_mock(config: MockConfig) -> anyhow::Result<MockProvider> {
    spawn_mock_on("127.0.0.1:0", config).await
}

pub async fn spawn_mock_on(addr: &str, config: MockConfig) -> anyhow::Result<MockProvider> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let (provider, app) = mock_app(listener.local_addr()?, config);
    tokio::spawn(serve_mock(listener, app));
    Ok(provider)
}

/// The mock's router, for a test that serves it some other way (over a dial-out link);
/// `addr` is what `MockProvider::addr` reports.
pub fn mock_app(addr: SocketAddr, mut config: MockConfig) -> (MockProvider, Router) {
    if config.models.is_empty() {
        config.models.push("mock-model".to_owned());
    }
    let provider = MockProvider {
        addr,
        requests: Arc::default(),
        bodies: Arc::default(),
        open_streams: Arc::default(),
        peak_streams: Arc::default(),
        cancelled: Arc::default(),
        http2_requests: Arc::default(),
        health_checks: Arc::default(),
    };
    let shared = Shared { config, provider: provider.clone() };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|State(s): State<Shared>| async move {
            s.provider.health_checks.fetch_add(1, Ordering::Relaxed);
            Json(json!({"status": "ok"}))
        }))
        .with_state(shared);
    (provider, app)
}

/// HTTP/1.1 and h2c (prior knowledge) on one port, as `axum::serve` does, but with no
/// cap on concurrent HTTP/2 streams (hyper's default is 200), so that a gateway that
/// multiplexes can hold the benchmark's 10,000 open streams on one connection.
async fn serve_mock(listener: tokio::net::TcpListener, app: Router) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(None);
    let builder = Arc::new(builder);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        // Real servers turn Nagle off for SSE; without it a chunk written right after
        // another waits for the client's delayed ACK (~40 ms), which would swamp what
        // the benchmark measures.
        let _ = tcp.set_nodelay(true);
        let service = app.clone().map_request(|r: axum::http::Request<hyper::body::Incoming>| r.map(Body::new));
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(service);
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    let data: Vec<Value> =
        s.config.models.iter().map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "mock"})).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn chat(State(s): State<Shared>, version: axum::http::Version, Json(body): Json<Value>) -> Response {
    count_version(&s, version);
    respond(s, body, true).await
}

async fn completions(State(s): State<Shared>, version: axum::http::Version, Json(body): Json<Value>) -> Response {
    count_version(&s, version);
    respond(s, body, false).await
}

fn count_version(s: &Shared, version: axum::http::Version) {
    if version == axum::http::Version::HTTP_2 {
        s.provider.http2_requests.fetch_add(1, Ordering::SeqCst);
    }
}

fn last_user_text(body: &Value) -> String {
    if let Some(p) = body["prompt"].as_str() {
        return p.to_owned();
    }
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

/// Decrements the open-stream gauge and counts streams the client abandoned.
/// Words in every message's text (or the prompt): the mock's prompt token count.
fn prompt_words(body: &Value) -> usize {
    if let Some(p) = body["prompt"].as_str() {
        return p.split_whitespace().count();
    }
    let words = |v: &Value| match v {
        Value::String(s) => s.split_whitespace().count(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).map(|t| t.split_whitespace().count()).sum(),
        _ => 0,
    };
    body["messages"].as_array().map_or(0, |m| m.iter().map(|m| words(&m["content"])).sum())
}

struct StreamGuard {
    provider: MockProvider,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.provider.open_streams.fetch_sub(1, Ordering::SeqCst);
        if !self.finished {
            self.provider.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn respond(s: Shared, body: Value, chat: bool) -> Response {
    let nth = s.provider.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if s.config.fail_every.is_some_and(|n| n > 0 && nth % n == 0) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "intermittent failure").into_response();
    }
    s.provider.bodies.lock().push(body.clone());
    let text = last_user_text(&body);
    if let Some(code) = s.config.fail_status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, Json(json!({"error": {"message": "mock failure", "type": "server_error", "param": null, "code": null}})))
            .into_response();
    }
    if text.contains("[fail-before]") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    if text.contains("[reject]") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "mock rejects this", "type": "invalid_request_error", "param": "messages", "code": null}})),
        )
            .into_response();
    }
    let model = body["model"].as_str().unwrap_or("mock-model").to_owned();
    let max_tokens = body["max_tokens"].as_u64().map_or(REPLY.len(), |n| usize::try_from(n).unwrap_or(usize::MAX));
    let n_tokens = REPLY.len().min(max_tokens);
    let finish = if n_tokens < REPLY.len() { "length" } else { "stop" };
    // Every message counts (a replayed conversation costs more than its last turn).
    let prompt_tokens = prompt_words(&body).max(1);
    // `[tool]` in the user's text with tools offered: the answer is a call of the first
    // tool, until the conversation carries its result.
    let tool_call = chat
        && text.contains("[tool]")
        && body["tools"].as_array().is_some_and(|t| !t.is_empty())
        && body["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["role"] != "tool");
    let tool_name = body["tools"][0]["function"]["name"].as_str().unwrap_or("f").to_owned();
    let include_usage = body["stream_options"]["include_usage"].as_bool().unwrap_or(false) && !s.config.omit_usage;
    let fail_mid = text.contains("[fail-mid]") || s.config.die_mid_stream;
    let idle = text.contains("[idle]");
    // Hostile providers: after the first word, an event that never ends (no blank
    // line), or well-formed chunks that never stop; both until the client goes away.
    let flood = text.contains("[flood]");
    let endless = text.contains("[endless]");
    let overrun = text.contains("[overrun]");
    let slow = text.contains("[slow]");
    let delay = s.config.first_chunk_delay;
    let overreport = s.config.overreport.unwrap_or(1);
    let exact_report = s.config.completion_tokens;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let open = s.provider.open_streams.fetch_add(1, Ordering::SeqCst) + 1;
    s.provider.peak_streams.fetch_max(open, Ordering::SeqCst);
    let provider = s.provider.clone();
    tokio::spawn(async move {
        let mut guard = StreamGuard { provider, finished: false };
        let id = "mock-1";
        let chunk = |delta: Value, finish: Value| -> Bytes {
            let choice = if chat {
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            } else {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null})
            };
            let object = if chat { "chat.completion.chunk" } else { "text_completion" };
            let v = json!({"id": id, "object": object, "created": 1_700_000_000, "model": model, "choices": [choice]});
            Bytes::from(format!("data: {v}\n\n"))
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if chat && tx.send(Ok(chunk(json!({"role": "assistant", "content": ""}), Value::Null))).await.is_err() {
            return;
        }
        if tool_call {
            let call = |function: Value| json!({"tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function", "function": function}]});
            let parts = [
                call(json!({"name": tool_name, "arguments": ""})),
                call(json!({"arguments": "{\"city\": "})),
                call(json!({"arguments": "\"Paris\"}"})),
                json!({}),
            ];
            let last = parts.len() - 1;
            for (i, delta) in parts.into_iter().enumerate() {
                let finish = if i == last { json!("tool_calls") } else { Value::Null };
                if tx.send(Ok(chunk(delta, finish))).await.is_err() {
                    return;
                }
            }
            if include_usage {
                let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3});
                let v = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [], "usage": usage});
                if tx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).await.is_err() {
                    return;
                }
            }
            if tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await.is_ok() {
                guard.finished = true;
            }
            return;
        }
        for (i, word) in REPLY.iter().take(n_tokens).enumerate() {
            if fail_mid && i == 2 {
                // Let the tokens so far reach the client before the connection dies.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(Err(std::io::Error::other("mock died"))).await;
                return;
            }
            if tx.send(Ok(chunk(json!({"content": word}), Value::Null))).await.is_err() {
                return;
            }
            if idle {
                // Hold the stream open until the client goes away.
                tx.closed().await;
                return;
            }
            if flood {
                let junk = Bytes::from(vec![b'x'; 64 * 1024]);
                for _ in 0..4096 {
                    if tx.send(Ok(junk.clone())).await.is_err() {
                        return;
                    }
                }
                return;
            }
            if overrun {
                // Ignores `max_tokens`: 100 more words, an honest-looking finish and a
                // usage report of everything.
                for _ in 0..100 {
                    if tx.send(Ok(chunk(json!({"content": " more"}), Value::Null))).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Ok(chunk(json!({}), json!("stop")))).await;
                let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 101, "total_tokens": prompt_tokens + 101});
                let v = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [], "usage": usage});
                let _ = tx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                guard.finished = true;
                return;
            }
            if endless {
                for _ in 0..100_000 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.send(Ok(chunk(json!({"content": " and"}), Value::Null))).await.is_err() {
                        return;
                    }
                }
                return;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if tx.send(Ok(chunk(json!({}), json!(finish)))).await.is_err() {
            return;
        }
        if include_usage {
            let reported = exact_report.unwrap_or(n_tokens * overreport);
            let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": reported, "total_tokens": prompt_tokens + reported});
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [], "usage": usage});
            if tx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).await.is_err() {
                return;
            }
        }
        if tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await.is_ok() {
            guard.finished = true;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}
