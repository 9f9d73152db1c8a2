//! The relay: send a resolved request to a provider (always streaming, with usage),
//! fail over before the first token, then hand the provider's events to the caller one
//! at a time. Callers forward them as SSE, aggregate them into one JSON response, or
//! turn them into WebSocket events. Usage is recorded when the relay is dropped, so a
//! client that disconnects is accounted for too.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use openapi::stream::{StreamChunk, Usage};

use crate::error::ApiError;
use crate::keys::AuthedKey;
use crate::providers::Provider;
use crate::routing;
use crate::store::now_ms;
use crate::usage::{UsageRecord, UsageSink, UsageStatus};
use crate::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat.completions",
            Self::Completions => "completions",
        }
    }
}

/// A validated request, ready for a provider.
pub struct Dispatch {
    pub endpoint: Endpoint,
    pub request_id: String,
    pub key: Arc<AuthedKey>,
    pub model: String,
    pub quality: String,
    /// The JSON body for the provider (stream and usage already forced on).
    pub body: Bytes,
    /// Optional features the request uses; only providers that honour them qualify.
    pub features: Vec<&'static str>,
    /// Rough prompt size, for the usage record when the provider reports none.
    pub prompt_estimate: u32,
    pub started: Instant,
}

/// One event from the provider's stream.
pub enum Event {
    Chunk { data: Bytes, chunk: StreamChunk },
    Done,
    /// The provider failed after the first token.
    Failed(String),
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Splits a `text/event-stream` body into `data:` payloads.
struct SseReader {
    body: ByteStream,
    buf: BytesMut,
}

impl SseReader {
    fn new(body: ByteStream) -> Self {
        Self { body, buf: BytesMut::with_capacity(4096) }
    }

    /// The next data payload; `Ok(None)` at the end of the body.
    async fn next_data(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(data) = self.take_event() {
                match data {
                    Some(d) => return Ok(Some(d)),
                    None => continue,
                }
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buf.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(format!("provider stream broke: {e}")),
                None => return Ok(None),
            }
        }
    }

    /// `Some(Some(data))` for an event with data, `Some(None)` for one without
    /// (comments, keep-alives), `None` when no complete event is buffered.
    fn take_event(&mut self) -> Option<Option<Bytes>> {
        let (end, sep) = find_event_end(&self.buf)?;
        let event = self.buf.split_to(end + sep).freeze();
        let event = event.slice(..end);
        let mut data: Option<BytesMut> = None;
        for line in event.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                match &mut data {
                    Some(d) => {
                        d.extend_from_slice(b"\n");
                        d.extend_from_slice(rest);
                    }
                    None => data = Some(BytesMut::from(rest)),
                }
            }
        }
        Some(data.map(BytesMut::freeze))
    }
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Accounting for one request; records its usage row when dropped.
struct Tracker {
    sink: UsageSink,
    record: Option<UsageRecord>,
    started: Instant,
    reported: Option<Usage>,
    counted_completion: u32,
    prompt_estimate: u32,
    status: UsageStatus,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else { return };
        // The provider's usage wins when it sent one; otherwise our own count of
        // content chunks (one token each for the servers we know) stands in.
        let usage = self.reported.unwrap_or(Usage {
            prompt_tokens: self.prompt_estimate,
            completion_tokens: self.counted_completion,
            total_tokens: self.prompt_estimate + self.counted_completion,
        });
        record.prompt_tokens = usage.prompt_tokens;
        record.completion_tokens = usage.completion_tokens;
        record.latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        record.status = self.status;
        self.sink.record(record);
    }
}

/// Holds a provider's in-flight slot for the life of the relay.
struct Slot(Arc<Provider>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn take_slot(provider: Arc<Provider>) -> Slot {
    provider.load.in_flight.fetch_add(1, Ordering::Relaxed);
    Slot(provider)
}

/// A provider stream that has delivered its first token.
pub struct Relay {
    reader: SseReader,
    pending: VecDeque<Bytes>,
    tracker: Tracker,
    slot: Slot,
    idle_timeout: Duration,
    finished: bool,
    active: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Relay {
    pub fn provider(&self) -> &Arc<Provider> {
        &self.slot.0
    }

    pub fn usage(&self) -> Usage {
        self.tracker.reported.unwrap_or(Usage {
            prompt_tokens: self.tracker.prompt_estimate,
            completion_tokens: self.tracker.counted_completion,
            total_tokens: self.tracker.prompt_estimate + self.tracker.counted_completion,
        })
    }

    pub async fn next(&mut self) -> Event {
        if self.finished {
            return Event::Done;
        }
        let data = match self.pending.pop_front() {
            Some(d) => Ok(Some(d)),
            None => match tokio::time::timeout(self.idle_timeout, self.reader.next_data()).await {
                Ok(r) => r,
                Err(_) => Err("provider stopped sending".to_owned()),
            },
        };
        match data {
            Ok(Some(data)) if data.as_ref() == b"[DONE]" => self.finish(UsageStatus::Ok),
            Ok(Some(data)) => match serde_json::from_slice::<StreamChunk>(&data) {
                Ok(chunk) if chunk.error.is_some() => {
                    self.fail(format!("provider reported an error: {}", chunk.error.unwrap_or_default()))
                }
                Ok(chunk) => {
                    self.observe(&chunk);
                    Event::Chunk { data, chunk }
                }
                Err(e) => self.fail(format!("provider sent an invalid chunk: {e}")),
            },
            // A stream that ends without [DONE] after finishing its choices is complete.
            Ok(None) => self.fail("provider closed the stream early".to_owned()),
            Err(e) => self.fail(e),
        }
    }

    fn observe(&mut self, chunk: &StreamChunk) {
        if let Some(u) = chunk.usage {
            self.tracker.reported = Some(u);
        }
        let tokens = chunk.choices.iter().filter(|c| carries_token(c)).count();
        if tokens > 0 {
            if let Some(record) = &mut self.tracker.record {
                record.ttft_ms.get_or_insert_with(|| {
                    u64::try_from(self.tracker.started.elapsed().as_millis()).unwrap_or(u64::MAX)
                });
            }
            self.tracker.counted_completion += u32::try_from(tokens).unwrap_or(u32::MAX);
        }
    }

    fn finish(&mut self, status: UsageStatus) -> Event {
        self.finished = true;
        self.tracker.status = status;
        Event::Done
    }

    fn fail(&mut self, message: String) -> Event {
        self.finished = true;
        self.tracker.status = UsageStatus::ProviderFailed;
        if let Some(r) = &mut self.tracker.record {
            r.error_code = Some("provider_error".to_owned());
        }
        tracing::warn!(provider = %self.slot.0.id, %message, "provider failed mid-stream");
        Event::Failed(message)
    }
}

fn carries_token(choice: &openapi::stream::ChunkChoice) -> bool {
    choice.text.as_deref().is_some_and(|t| !t.is_empty())
        || choice.delta.as_ref().is_some_and(|d| {
            d.content.as_deref().is_some_and(|c| !c.is_empty())
                || d.refusal.as_deref().is_some_and(|c| !c.is_empty())
                || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
        })
}

fn is_first_token_event(chunk: &StreamChunk) -> bool {
    chunk.usage.is_some() || chunk.choices.iter().any(|c| carries_token(c) || c.finish_reason.is_some())
}

enum AttemptError {
    /// Try another provider.
    Retry(String),
    Timeout,
    /// The provider judged the request itself invalid: no point retrying elsewhere.
    Rejected(ApiError),
}

/// Picks a provider and opens its stream, failing over until the first token arrives.
pub async fn open(state: &AppState, dispatch: Dispatch) -> Result<Relay, ApiError> {
    let config = &state.config;
    let stale_ms = i64::try_from(config.provider_stale_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let snapshot = state.registry.snapshot();
    let found = routing::candidates(&snapshot, &dispatch.model, &dispatch.quality, &dispatch.features, now_ms(), stale_ms);
    if !found.model_known {
        return Err(ApiError::ModelNotFound { model: dispatch.model });
    }
    if let Some(feature) = found.unsupported_feature {
        return Err(ApiError::param(
            format!("no provider serving `{}` supports `{feature}`", dispatch.model),
            feature_param(feature),
        ));
    }
    let mut tracker = Tracker {
        sink: state.usage.clone(),
        record: Some(UsageRecord {
            request_id: dispatch.request_id.clone(),
            key_id: Some(dispatch.key.key_id.clone()),
            user_id: Some(dispatch.key.user_id.clone()),
            endpoint: dispatch.endpoint.name(),
            model: dispatch.model.clone(),
            provider_id: None,
            quality: dispatch.quality.clone(),
            prompt_tokens: 0,
            completion_tokens: 0,
            ttft_ms: None,
            latency_ms: 0,
            status: UsageStatus::Failed,
            error_code: None,
            created_at: now_ms(),
        }),
        started: dispatch.started,
        reported: None,
        counted_completion: 0,
        prompt_estimate: dispatch.prompt_estimate,
        status: UsageStatus::Failed,
    };
    let mut tried: Vec<String> = Vec::new();
    let mut last_error: Option<AttemptError> = None;
    for _ in 0..config.max_attempts {
        let Some(provider) = routing::pick(&found.eligible, &tried) else { break };
        tried.push(provider.id.clone());
        let slot = take_slot(provider.clone());
        let attempt = tokio::time::timeout(
            Duration::from_secs(config.first_token_timeout_secs),
            first_token(state, &provider, dispatch.endpoint, dispatch.body.clone()),
        )
        .await
        .unwrap_or(Err(AttemptError::Timeout));
        match attempt {
            Ok((reader, pending)) => {
                if let Some(r) = &mut tracker.record {
                    r.provider_id = Some(provider.id.clone());
                }
                // Until the relay is consumed to its end, a drop means the client left.
                tracker.status = UsageStatus::ClientDisconnected;
                state.active_streams.fetch_add(1, Ordering::Relaxed);
                let mut relay = Relay {
                    reader,
                    pending: VecDeque::new(),
                    tracker,
                    slot,
                    idle_timeout: Duration::from_secs(config.idle_chunk_timeout_secs),
                    finished: false,
                    active: state.active_streams.clone(),
                };
                relay.pending = pending;
                return Ok(relay);
            }
            Err(AttemptError::Rejected(e)) => {
                if let Some(r) = &mut tracker.record {
                    r.provider_id = Some(provider.id.clone());
                    r.error_code = Some("provider_rejected".to_owned());
                }
                return Err(e);
            }
            Err(e) => {
                match &e {
                    AttemptError::Retry(m) => tracing::warn!(provider = %provider.id, error = %m, "provider failed before the first token; failing over"),
                    AttemptError::Timeout => tracing::warn!(provider = %provider.id, "provider timed out before the first token; failing over"),
                    AttemptError::Rejected(_) => {}
                }
                last_error = Some(e);
            }
        }
    }
    let error = match last_error {
        None => ApiError::NoProvider { model: dispatch.model },
        Some(AttemptError::Timeout) => ApiError::ProviderTimeout,
        Some(AttemptError::Retry(m)) => ApiError::ProviderFailed(m),
        Some(AttemptError::Rejected(e)) => e,
    };
    if let Some(r) = &mut tracker.record {
        r.error_code = error.body().error.code;
    }
    Err(error)
}

/// Sends the request and reads events up to and including the first one that carries
/// a token (or a finish reason, or usage).
async fn first_token(
    state: &AppState,
    provider: &Provider,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<(SseReader, VecDeque<Bytes>), AttemptError> {
    let url = format!("{}{}", provider.base_url, endpoint.path());
    let response = state
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| AttemptError::Retry(format!("cannot reach provider: {}", without_url(&e))))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let parsed: Option<openapi::error::ErrorBody> = serde_json::from_str(&text).ok();
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            let (message, param, code) = match parsed {
                Some(b) => (b.error.message, b.error.param, b.error.code),
                None => (format!("the provider rejected the request ({status})"), None, None),
            };
            let status = if status.as_u16() == 404 { http::StatusCode::NOT_FOUND } else { http::StatusCode::BAD_REQUEST };
            return Err(AttemptError::Rejected(ApiError::ProviderRejected { status, message, param, code }));
        }
        return Err(AttemptError::Retry(format!("provider answered {status}")));
    }
    let mut reader = SseReader::new(Box::pin(response.bytes_stream()));
    let mut pending = VecDeque::new();
    loop {
        match reader.next_data().await {
            Ok(Some(data)) => {
                if data.as_ref() == b"[DONE]" {
                    return Err(AttemptError::Retry("provider ended the stream without output".into()));
                }
                let chunk: StreamChunk = serde_json::from_slice(&data)
                    .map_err(|e| AttemptError::Retry(format!("provider sent an invalid chunk: {e}")))?;
                if chunk.error.is_some() {
                    return Err(AttemptError::Retry("provider reported an error before the first token".into()));
                }
                let first = is_first_token_event(&chunk);
                pending.push_back(data);
                if first {
                    return Ok((reader, pending));
                }
            }
            Ok(None) => return Err(AttemptError::Retry("provider closed the stream before the first token".into())),
            Err(e) => return Err(AttemptError::Retry(e)),
        }
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<provider>");
    }
    if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else {
        s
    }
}

pub fn feature_param(feature: &str) -> &'static str {
    match feature {
        "tools" => "tools",
        "logprobs" => "logprobs",
        "response_format" => "response_format",
        "n" => "n",
        "logit_bias" => "logit_bias",
        "seed" => "seed",
        "penalties" => "presence_penalty",
        "stop" => "stop",
        "vision" => "messages",
        _ => "model",
    }
}

/// OpenAI's in-stream error event, which the SDKs raise as `APIError`.
pub fn error_event(message: &str) -> Bytes {
    let body = serde_json::json!({
        "error": { "message": message, "type": "server_error", "param": null, "code": "provider_error" }
    });
    Bytes::from(format!("data: {body}\n\n"))
}
