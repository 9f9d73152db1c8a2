//! The relay: send a resolved request to a provider (always streaming, with usage),
//! fail over before the first token, then hand the provider's events to the caller one
//! at a time. Callers forward them as SSE, aggregate them into one JSON response, or
//! turn them into WebSocket events. Usage is recorded when the relay is dropped, so a
//! client that disconnects is accounted for too. Who pays is not decided here: the
//! relay calls `funding::reserve` before each provider attempt and `Funding::settle`
//! when the request ends.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use openapi::stream::{StreamChunk, Usage};

use crate::inference::delivered::{carries_token, Delivered};
use crate::edge::error::ApiError;
use crate::money::funding::{self, Funding};
use crate::edge::keys::AuthedKey;
use crate::inference::capacity::Slot;
use crate::inference::providers::Provider;
use crate::inference::routing;
use crate::store::now_ms;
use crate::money::units::Micros;
use crate::edge::ratelimit::{RateCtx, TokenCharge};
use crate::money::usage::{Completion, UsageRecord, UsageSink, UsageStatus};
use crate::state::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    /// `/v1/responses`, relayed to the provider as a chat completion.
    Responses,
    /// `/v1/embeddings`: one JSON answer, not a stream (`embed`), with a vector for
    /// each of `inputs`, as base64 strings or arrays of numbers.
    Embeddings { inputs: u32, base64: bool },
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Self::Chat | Self::Responses => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings { .. } => "/v1/embeddings",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat.completions",
            Self::Completions => "completions",
            Self::Responses => "responses",
            Self::Embeddings { .. } => "embeddings",
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
    /// The resolved level (what it serves on, its minimum provider score and precision).
    pub level: crate::inference::quality::QualityLevel,
    /// The JSON body for the provider (stream and usage already forced on).
    pub body: Bytes,
    /// Optional features the request uses; only providers that honour them qualify.
    pub features: Vec<&'static str>,
    /// Size of the provider request body; bounds the prompt's token count.
    pub body_bytes: u32,
    /// Completion tokens the provider may produce at most (all choices together).
    pub max_completion_tokens: u32,
    /// The most prompt tokens the request can be, when the gateway can count them
    /// (embeddings): the rate limiter's estimate, the hold and the most a provider's
    /// report is believed. Otherwise the body's size bounds them.
    pub prompt_tokens: Option<u32>,
    /// The tier's price multiplier in basis points.
    pub cost_multiplier_bp: u32,
    /// Run on this reservation's provider, billed by the hour instead of per token.
    pub reservation: Option<String>,
    /// The request's rate-limit state; the token estimate is charged against it.
    pub rate: Option<Arc<RateCtx>>,
    /// Who may serve it, from `routing::route` (the relay does not route again).
    pub candidates: routing::Candidates,
    pub started: Instant,
}

/// One event from the provider's stream.
// A chunk is nearly every event: boxing it would allocate once per chunk to shrink the
// rare `Done` and `Failed`.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Chunk { data: Bytes, chunk: StreamChunk },
    Done,
    /// The provider failed after the first token.
    Failed(String),
}

use crate::inference::open_links::ByteStream;

/// What a provider's stream may send: every provider may be hostile, so an event
/// without an end or a stream without one cannot grow the gateway's memory.
#[derive(Debug, Clone, Copy)]
pub struct StreamBounds {
    /// One SSE event (`provider_max_event_bytes`).
    pub max_event: usize,
    /// The whole response body (`provider_max_response_bytes`).
    pub max_total: u64,
}

impl StreamBounds {
    pub fn of(config: &crate::ops::config::Config) -> Self {
        Self { max_event: config.provider_max_event_bytes, max_total: config.provider_max_response_bytes }
    }
}

/// Splits a `text/event-stream` body into `data:` payloads.
struct SseReader {
    body: ByteStream,
    buf: BytesMut,
    /// The first `scanned` bytes of `buf` hold no event end: the next search starts
    /// there (less the 3 bytes a `\r\n\r\n` could straddle), so a long event is not
    /// rescanned from its start on every read.
    scanned: usize,
    /// Bytes read from the body so far.
    total: u64,
    bounds: StreamBounds,
}

impl SseReader {
    fn new(body: ByteStream, bounds: StreamBounds) -> Self {
        // Events are a few hundred bytes and an idle stream keeps its buffer: start small
        // (it grows for a larger event).
        Self { body, buf: BytesMut::with_capacity(512), scanned: 0, total: 0, bounds }
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
            if self.buf.len() > self.bounds.max_event {
                return Err(format!("provider sent an event larger than {} bytes", self.bounds.max_event));
            }
            match self.body.next().await {
                Some(Ok(bytes)) => {
                    self.total = self.total.saturating_add(bytes.len() as u64);
                    if self.total > self.bounds.max_total {
                        return Err(format!("provider's response grew larger than {} bytes", self.bounds.max_total));
                    }
                    self.buf.extend_from_slice(&bytes);
                }
                Some(Err(e)) => return Err(format!("provider stream broke: {e}")),
                None => return Ok(None),
            }
        }
    }

    /// `Some(Some(data))` for an event with data, `Some(None)` for one without
    /// (comments, keep-alives), `None` when no complete event is buffered.
    fn take_event(&mut self) -> Option<Option<Bytes>> {
        let from = self.scanned.saturating_sub(3);
        let Some((end, sep)) = find_event_end(&self.buf[from..]).map(|(end, sep)| (from + end, sep)) else {
            self.scanned = self.buf.len();
            return None;
        };
        self.scanned = 0;
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

/// Accounting for one request: its usage row and its settlement, sent to the writer
/// when the request ends or, at the latest, when the relay is dropped.
struct Tracker {
    sink: UsageSink,
    record: Option<UsageRecord>,
    funding: Option<Funding>,
    started: Instant,
    reported: Option<Usage>,
    /// What the provider delivered, counted by the gateway.
    delivered: Delivered,
    body_bytes: u32,
    /// The prompt's tokens as the gateway counted them (`Dispatch::prompt_tokens`).
    prompt_counted: Option<u32>,
    cost_multiplier_bp: u32,
    fee_bp: u32,
    /// The serving provider and its price, once one delivered a token.
    provider: Option<(String, i64)>,
    /// The charge fixed when the request was settled.
    settled_charge: Option<Micros>,
    /// The serving provider's health, for the honesty signal.
    health: Option<Arc<Provider>>,
    /// The token estimate charged to the rate limiter, corrected at the end.
    token_charge: Option<TokenCharge>,
    status: UsageStatus,
    /// The request's completion-token limit (all choices).
    max_completion: u32,
    /// The provider sent past that limit and the stream was cut.
    overran: bool,
    /// Where a provider's probation progress is kept, and how long probation is.
    probation: (crate::store::Store, u32),
}

impl Tracker {
    /// The usage that is billed: the provider's report when it is plausible, else our
    /// count (`delivered`: the model's tokenizer, or content chunks without one).
    fn billed_usage(&self) -> (Usage, &'static str) {
        let (mut usage, mut source) = self.reported_or_counted();
        // Never more completion tokens than the request allowed, whoever counted them: a
        // provider that ran past the limit is paid for the limit and flagged.
        if usage.completion_tokens > self.max_completion || self.overran {
            usage.completion_tokens = usage.completion_tokens.min(self.max_completion);
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
            source = "gateway_flagged";
        }
        (usage, source)
    }

    fn reported_or_counted(&self) -> (Usage, &'static str) {
        // Without the gateway's count, a prompt token is at least one byte of the request.
        let (bound, estimate) = match self.prompt_counted {
            Some(n) => (n, n),
            None => (self.body_bytes, self.body_bytes / 3),
        };
        let counted = self.delivered.count();
        match self.reported {
            Some(u) if u.prompt_tokens <= bound && self.delivered.plausible(u.completion_tokens) => {
                (Usage { total_tokens: u.prompt_tokens + u.completion_tokens, cost: None, ..u }, "provider")
            }
            Some(u) => {
                tracing::debug!(reported = ?u, counted, by_tokenizer = self.delivered.by_tokenizer(), "implausible usage from provider; billing our own count");
                let prompt = if u.prompt_tokens <= bound { u.prompt_tokens } else { estimate };
                (Usage { prompt_tokens: prompt, completion_tokens: counted, total_tokens: prompt + counted, cost: None }, "gateway_flagged")
            }
            None => (
                Usage { prompt_tokens: estimate, completion_tokens: counted, total_tokens: estimate + counted, cost: None },
                "gateway",
            ),
        }
    }

    /// The billed usage with its cost in USD.
    fn usage_with_cost(&self) -> Usage {
        let (mut usage, _) = self.billed_usage();
        usage.cost = Some(crate::money::units::usd(self.charge(&usage)));
        usage
    }

    /// The request ended well: its usage row and settlement go to the writer, and this
    /// waits until they committed (the caller answers only then).
    async fn settle_ok(&mut self) -> Result<(), &'static str> {
        self.status = UsageStatus::Ok;
        let (ack, committed) = tokio::sync::oneshot::channel();
        let Some(completion) = self.completion(Some(ack)) else { return Ok(()) };
        self.sink.record(completion);
        match committed.await {
            Ok(true) => Ok(()),
            _ => Err("the request could not be settled; it was not billed"),
        }
    }

    /// The charge for what was delivered, capped by the hold.
    fn charge(&self, usage: &Usage) -> Micros {
        if let Some(charge) = self.settled_charge {
            return charge;
        }
        let Some((_, per_mtok)) = &self.provider else { return 0 };
        self.funding.as_ref().map_or(0, |f| f.charge(u64::from(usage.total_tokens), *per_mtok, self.cost_multiplier_bp))
    }

    /// The request ends before any provider is called (it could not be funded): no
    /// usage row, and the rate limiter's token estimate is given back.
    fn abandon(&mut self) {
        self.record = None;
        if let Some(charge) = self.token_charge.take() {
            charge.settle(0);
        }
    }

    fn completion(&mut self, ack: Option<tokio::sync::oneshot::Sender<bool>>) -> Option<Completion> {
        let mut record = self.record.take()?;
        let (usage, source) = self.billed_usage();
        if let Some(health) = &self.health {
            if self.reported.is_some() {
                health.load.health.record_honesty(source != "gateway_flagged");
            }
            if health.probation_left > 0 {
                let (store, length) = self.probation.clone();
                match (self.status, source) {
                    (_, "gateway_flagged") | (UsageStatus::ProviderFailed, _) => {
                        crate::inference::providers::restart_probation(store, health.id.clone(), length);
                    }
                    (UsageStatus::Ok, _) => crate::inference::providers::advance_probation(store, health.id.clone()),
                    _ => {}
                }
            }
        }
        let charge = self.charge(&usage);
        self.settled_charge = Some(charge);
        if let Some(charge) = self.token_charge.take() {
            // Give back what the estimate over-charged (all of it when nothing ran).
            charge.settle(if self.provider.is_some() { usage.total_tokens } else { 0 });
        }
        record.prompt_tokens = usage.prompt_tokens;
        record.completion_tokens = usage.completion_tokens;
        record.usage_source = source;
        record.latency_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        record.status = self.status;
        let provider = self.provider.as_ref().map(|(id, _)| id.as_str());
        let (billing, payer) = match self.funding.take() {
            Some(funding) => funding.settle(&record.request_id, provider, charge, self.fee_bp),
            None => (None, None),
        };
        record.payer = payer;
        Some(Completion { record, billing, ack })
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if let Some(c) = self.completion(None) {
            self.sink.record(c);
        }
    }
}

/// Picks a provider and takes one of its slots (`capacity`: fleet-wide with Redis);
/// when every eligible one is busy, waits (bounded in time and in the number of
/// waiters) for a slot to free up, here or on another replica.
async fn pick_or_wait(
    state: &AppState,
    level: &crate::inference::quality::QualityLevel,
    eligible: &[Arc<Provider>],
    tried: &[String],
) -> Option<(Arc<Provider>, Slot)> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(state.config.queue_timeout_ms);
    // A provider routing saw room at may turn out full fleet-wide: its count is then
    // corrected (routing sees it busy and the next pick waits for a slot) and another
    // pick follows, until the queue's deadline. (A fixed number of tries ran out while
    // slots freed on this replica kept waking queued requests for slots other replicas
    // held: a 503 with the queue's time left.)
    loop {
        let provider = pick_waiting(state, level, eligible, tried, deadline).await?;
        if let Some(slot) = state.capacity.take(&provider).await {
            return Some((provider, slot));
        }
        provider.load.health.cancel_probe();
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Picks a provider with room as routing sees it, waiting until `deadline` while every
/// eligible one is busy.
async fn pick_waiting(
    state: &AppState,
    level: &crate::inference::quality::QualityLevel,
    eligible: &[Arc<Provider>],
    tried: &[String],
    deadline: tokio::time::Instant,
) -> Option<Arc<Provider>> {
    let weights = state.config.weights();
    let min_score = level.min_score;
    let pick = || match &state.routing_rng {
        Some(rng) => routing::pick_with(&mut *rng.lock(), eligible, tried, &weights, now_ms(), min_score),
        None => routing::pick(eligible, tried, &weights, now_ms(), min_score),
    };
    if let Some(p) = pick() {
        return Some(p);
    }
    if tokio::time::Instant::now() >= deadline || !routing::all_busy(eligible, tried) {
        return None;
    }
    if state.queued.fetch_add(1, Ordering::Relaxed) >= u64::from(state.config.queue_max) {
        state.queued.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let picked = loop {
        // Woken by a slot freed here, or by the fleet counts' refresh (`capacity::REFRESH`).
        let freed = state.capacity.freed.notified();
        if let Some(p) = pick() {
            break Some(p);
        }
        if tokio::time::timeout_at(deadline, freed).await.is_err() {
            break pick();
        }
    };
    state.queued.fetch_sub(1, Ordering::Relaxed);
    picked
}

/// Output chunks a provider may send past the request's `max_tokens` before its stream
/// is cut (a chunk carries at least one token, so this never cuts an honest stream).
const OVERRUN_SLACK: u32 = 16;

/// What a cut stream still sends, in order.
enum Cut {
    /// The `length` finish chunk, and the stream's `id`/`object`/`created`/`model`.
    Finish(Bytes, serde_json::Value),
    Usage(serde_json::Value),
    End,
}

/// A provider stream that has delivered its first token.
pub struct Relay {
    reader: SseReader,
    pending: VecDeque<Bytes>,
    tracker: Tracker,
    slot: Slot,
    idle_timeout: Duration,
    /// The request ends here whatever the provider does (`request_deadline_secs`).
    deadline: Instant,
    /// Chat (else legacy completions) chunks, for the chunks the gateway writes itself.
    chat: bool,
    /// Past `max_completion_tokens` + `OVERRUN_SLACK` output chunks the stream is cut:
    /// what is left to send before the end.
    cut: Option<Cut>,
    finished: bool,
    active: Arc<std::sync::atomic::AtomicU64>,
    /// Breaker threshold and cool-down, for a failure mid-stream.
    breaker: crate::inference::health::Breaking,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Relay {
    pub fn provider(&self) -> &Arc<Provider> {
        self.slot.provider()
    }

    /// The billed usage with its cost in USD.
    pub fn usage(&self) -> Usage {
        self.tracker.usage_with_cost()
    }

    pub async fn next(&mut self) -> Event {
        if self.finished {
            return Event::Done;
        }
        match self.cut.take() {
            Some(Cut::Finish(data, head)) => {
                self.cut = Some(Cut::Usage(head));
                let chunk = serde_json::from_slice(&data).unwrap_or_default();
                return Event::Chunk { data, chunk };
            }
            Some(Cut::Usage(mut head)) => {
                // The provider's usage chunk will not come: ours, with the capped count.
                self.cut = Some(Cut::End);
                head["choices"] = serde_json::json!([]);
                head["usage"] = serde_json::json!(self.usage());
                let data = Bytes::from(head.to_string());
                let chunk = serde_json::from_slice(&data).unwrap_or_default();
                return Event::Chunk { data, chunk };
            }
            Some(Cut::End) => return self.finish().await,
            None => {}
        }
        let data = match self.pending.pop_front() {
            Some(d) => Ok(Some(d)),
            None => {
                let left = self.deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(self.idle_timeout.min(left), self.reader.next_data()).await {
                    Ok(r) => r,
                    Err(_) if left <= self.idle_timeout => Err("provider went past the request deadline".to_owned()),
                    Err(_) => Err("provider stopped sending".to_owned()),
                }
            }
        };
        match data {
            Ok(Some(data)) if data.as_ref() == b"[DONE]" => self.finish().await,
            Ok(Some(data)) => match serde_json::from_slice::<StreamChunk>(&data) {
                Ok(chunk) if chunk.error.is_some() => {
                    self.fail(format!("provider reported an error: {}", chunk.error.unwrap_or_default()))
                }
                Ok(chunk) => {
                    self.observe(&chunk);
                    if self.tracker.delivered.chunks() > self.tracker.max_completion.saturating_add(OVERRUN_SLACK) {
                        self.overrun(&chunk);
                    }
                    let data = if chunk.usage.is_some() { self.with_cost(data) } else { data };
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
        if self.tracker.delivered.observe(chunk) > 0 {
            if let Some(record) = &mut self.tracker.record {
                record.ttft_us.get_or_insert_with(|| {
                    u64::try_from(self.tracker.started.elapsed().as_micros()).unwrap_or(u64::MAX)
                });
            }
        }
    }

    /// The provider sent more output than the request allows: the stream ends here
    /// with a `length` finish and our usage chunk (billed up to the limit, the provider
    /// flagged), and the provider's connection is dropped with the relay.
    fn overrun(&mut self, chunk: &StreamChunk) {
        self.tracker.overran = true;
        tracing::warn!(provider = %self.slot.provider().id, limit = self.tracker.max_completion, "provider went past max_tokens; stream cut");
        let object = if self.chat { "chat.completion.chunk" } else { "text_completion" };
        let head = serde_json::json!({ "id": chunk.id, "object": object, "created": chunk.created, "model": chunk.model });
        let mut indices: Vec<u32> = chunk.choices.iter().map(|c| c.index).collect();
        if indices.is_empty() {
            indices.push(0);
        }
        let choices: Vec<serde_json::Value> = indices
            .into_iter()
            .map(|index| {
                if self.chat {
                    serde_json::json!({ "index": index, "delta": {}, "finish_reason": "length", "logprobs": null })
                } else {
                    serde_json::json!({ "index": index, "text": "", "finish_reason": "length", "logprobs": null })
                }
            })
            .collect();
        let mut finish = head.clone();
        finish["choices"] = serde_json::Value::Array(choices);
        self.cut = Some(Cut::Finish(Bytes::from(finish.to_string()), head));
    }

    /// Adds `usage.cost` (USD) to the provider's usage chunk.
    fn with_cost(&self, data: Bytes) -> Bytes {
        let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&data) else { return data };
        let usage = self.usage();
        if let Some(u) = value.get_mut("usage").and_then(|u| u.as_object_mut()) {
            u.insert("cost".to_owned(), serde_json::json!(usage.cost.unwrap_or(0.0)));
        }
        serde_json::to_vec(&value).map(Bytes::from).unwrap_or(data)
    }

    /// The provider finished: settle, and only then report the end.
    async fn finish(&mut self) -> Event {
        self.finished = true;
        match self.tracker.settle_ok().await {
            Ok(()) => Event::Done,
            Err(message) => Event::Failed(message.to_owned()),
        }
    }

    fn fail(&mut self, message: String) -> Event {
        self.finished = true;
        self.tracker.status = UsageStatus::ProviderFailed;
        // Delivered tokens are billed; no one waits for this commit.
        if let Some(r) = &mut self.tracker.record {
            r.error_code = Some("provider_error".to_owned());
        }
        if let Some(c) = self.tracker.completion(None) {
            self.tracker.sink.record(c);
        }
        self.slot.provider().load.health.record_failure(now_ms(), self.breaker);
        tracing::warn!(provider = %self.slot.provider().id, %message, "provider failed mid-stream");
        Event::Failed(message)
    }
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

/// What a provider attempt got: a stream up to its first token, or (embeddings) the
/// whole answer.
enum Opened {
    Stream(SseReader, VecDeque<Bytes>),
    /// Checked by `whole_answer`.
    Whole(serde_json::Value),
}

/// A provider that answered: the request's accounting, its slot and what it sent.
struct Connected {
    tracker: Tracker,
    slot: Slot,
    opened: Opened,
}

/// Picks a provider and opens its stream, failing over until the first token arrives.
pub async fn open(state: &AppState, dispatch: Dispatch) -> Result<Relay, ApiError> {
    let config = &state.config;
    let deadline = dispatch.started + Duration::from_secs(config.request_deadline_secs);
    let chat = dispatch.endpoint != Endpoint::Completions;
    let Connected { tracker, slot, opened } = connect(state, dispatch).await?;
    let Opened::Stream(reader, pending) = opened else {
        return Err(ApiError::Internal("a stream endpoint got a whole answer".into()));
    };
    state.active_streams.fetch_add(1, Ordering::Relaxed);
    Ok(Relay {
        reader,
        pending,
        tracker,
        slot,
        idle_timeout: Duration::from_secs(config.idle_chunk_timeout_secs),
        deadline,
        chat,
        cut: None,
        finished: false,
        active: state.active_streams.clone(),
        breaker: config.breaking(),
    })
}

/// An embeddings answer: each input's vector in order (a base64 string or an array of
/// numbers, as asked) and the billed usage (with its cost).
pub struct Answer {
    pub embeddings: Vec<serde_json::Value>,
    pub usage: Usage,
}

/// Sends a request whose answer is one JSON body (`Endpoint::Embeddings`), failing over
/// until a provider answers with a well-formed one, and settles it before returning:
/// the caller answers the client only once the usage row and the charge committed.
pub async fn embed(state: &AppState, dispatch: Dispatch) -> Result<Answer, ApiError> {
    let Connected { mut tracker, slot, opened } = connect(state, dispatch).await?;
    let Opened::Whole(mut answer) = opened else {
        return Err(ApiError::Internal("a whole-answer endpoint got a stream".into()));
    };
    // `whole_answer` checked the vectors and that usage is there; only they are kept.
    let prompt_tokens = u32::try_from(answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
    let embeddings = match answer["data"].take() {
        serde_json::Value::Array(items) => items.into_iter().map(|mut item| item["embedding"].take()).collect(),
        _ => Vec::new(),
    };
    tracker.reported = Some(Usage { prompt_tokens, completion_tokens: 0, total_tokens: prompt_tokens, cost: None });
    let usage = tracker.usage_with_cost();
    tracker.settle_ok().await.map_err(|message| ApiError::Internal(message.into()))?;
    drop(slot);
    Ok(Answer { embeddings, usage })
}

/// Picks a provider and sends it the request, failing over (funding each attempt at
/// its provider's price) until one answers: with its first token for a stream, with
/// a well-formed body for a whole answer.
async fn connect(state: &AppState, dispatch: Dispatch) -> Result<Connected, ApiError> {
    let config = &state.config;
    let snapshot = state.registry.snapshot();
    if let Some(id) = &dispatch.reservation {
        let owned = snapshot.values().any(|p| {
            p.reservation.as_ref().is_some_and(|r| &r.id == id && r.user_id == dispatch.key.user_id && r.ends_at > now_ms())
        });
        if !owned {
            return Err(ApiError::param(format!("reservation {id} does not exist, has ended, or is not yours"), "reservation"));
        }
    }
    let found = &dispatch.candidates;
    if !found.model_known {
        return Err(ApiError::ModelNotFound { model: dispatch.model });
    }
    if let Some(feature) = found.unsupported_feature {
        return Err(ApiError::param(
            format!("no provider serving `{}` supports `{feature}`", dispatch.model),
            feature_param(feature),
        ));
    }
    // The prompt's tokens as counted, or estimated as the request's bytes / 4.
    let prompt_estimate = dispatch.prompt_tokens.unwrap_or(dispatch.body_bytes / 4);
    let token_charge = match &dispatch.rate {
        // Charged up front (the prompt + every completion token), corrected at the end.
        Some(rate) => Some(rate.charge_tokens(prompt_estimate + dispatch.max_completion_tokens).await?),
        None => None,
    };
    let mut tracker = Tracker {
        token_charge,
        health: None,
        funding: None,
        body_bytes: dispatch.body_bytes,
        prompt_counted: dispatch.prompt_tokens,
        cost_multiplier_bp: dispatch.cost_multiplier_bp,
        fee_bp: config.platform_fee_bp,
        provider: None,
        settled_charge: None,
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
            ttft_us: None,
            latency_ms: 0,
            status: UsageStatus::Failed,
            error_code: None,
            created_at: now_ms(),
            cost_micros: 0,
            payer: None,
            usage_source: "gateway",
        }),
        started: dispatch.started,
        reported: None,
        delivered: Delivered::new(state.tokenizers.get(&dispatch.model)),
        status: UsageStatus::Failed,
        max_completion: dispatch.max_completion_tokens,
        overran: false,
        probation: (state.store.clone(), config.probation_requests),
    };
    // Providers on probation get at most their share of a model's requests while a
    // trusted provider serves it: this request's first pick is from one group only.
    let first_pool = state.probation.first_pool(&dispatch.model, &found.eligible, config.probation_max_share);
    let mut tried: Vec<String> = Vec::new();
    let mut last_error: Option<AttemptError> = None;
    for attempt in 0..config.max_attempts {
        let pool = match &first_pool {
            Some(pool) if attempt == 0 => pool.as_slice(),
            _ => found.eligible.as_slice(),
        };
        let mut picked = pick_or_wait(state, &dispatch.level, pool, &tried).await;
        if picked.is_none() && attempt == 0 && first_pool.is_some() {
            picked = pick_or_wait(state, &dispatch.level, &found.eligible, &tried).await;
        }
        let Some((provider, slot)) = picked else { break };
        tried.push(provider.id.clone());
        // Route first, then hold: the request is funded at the chosen provider's price
        // (and funded again when a failover moves to a dearer one).
        let ask = funding::Ask {
            key: &dispatch.key,
            request_id: &dispatch.request_id,
            max_tokens: u64::from(dispatch.prompt_tokens.unwrap_or(dispatch.body_bytes)) + u64::from(dispatch.max_completion_tokens),
            multiplier_bp: dispatch.cost_multiplier_bp,
            reserved: dispatch.reservation.is_some(),
        };
        match funding::reserve(state, &ask, provider.price_per_mtok, tracker.funding.take()).await {
            Ok(funding) => tracker.funding = Some(funding),
            Err(e) => {
                provider.load.health.cancel_probe();
                tracker.abandon();
                return Err(e);
            }
        }
        if first_pool.is_some() && provider.probation_left > 0 {
            state.probation.served(&dispatch.model);
        }
        let attempt_started = Instant::now();
        let body = personalise(&dispatch.body, &dispatch.key.user_id, state, &provider);
        let attempt = match dispatch.endpoint {
            // The whole answer is computed before any byte of it comes: it has until
            // the request's deadline.
            Endpoint::Embeddings { inputs, base64 } => {
                let left = (dispatch.started + Duration::from_secs(config.request_deadline_secs)).saturating_duration_since(Instant::now());
                tokio::time::timeout(left, whole_answer(state, &provider, dispatch.endpoint, body, inputs, base64)).await.map(|r| r.map(Opened::Whole))
            }
            _ => tokio::time::timeout(Duration::from_secs(config.first_token_timeout_secs), first_token(state, &provider, dispatch.endpoint, body))
                .await
                .map(|r| r.map(|(reader, pending)| Opened::Stream(reader, pending))),
        }
        .unwrap_or(Err(AttemptError::Timeout));
        match attempt {
            Ok(opened) => {
                if let Some(r) = &mut tracker.record {
                    r.provider_id = Some(provider.id.clone());
                }
                tracker.provider = Some((provider.id.clone(), provider.price_per_mtok));
                provider.load.health.record_success(attempt_started.elapsed().as_secs_f64() * 1000.0);
                tracker.health = Some(provider.clone());
                // Until the request is settled, a drop means the client left.
                tracker.status = UsageStatus::ClientDisconnected;
                return Ok(Connected { tracker, slot, opened });
            }
            Err(AttemptError::Rejected(e)) => {
                if matches!(dispatch.endpoint, Endpoint::Embeddings { .. }) {
                    // The provider judged the input (the gateway checks what it can
                    // first): bad input leaves no usage row, as the gateway's own 400s.
                    tracker.abandon();
                } else if let Some(r) = &mut tracker.record {
                    r.provider_id = Some(provider.id.clone());
                    r.error_code = Some("provider_rejected".to_owned());
                }
                return Err(e);
            }
            Err(e) => {
                provider.load.health.record_failure(now_ms(), config.breaking());
                if provider.probation_left > 0 {
                    crate::inference::providers::restart_probation(state.store.clone(), provider.id.clone(), config.probation_requests);
                }
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

/// The provider request with the user id this provider sees (`AppState::pseudonym_for`)
/// in place of the placeholder written before routing.
fn personalise(body: &Bytes, user_id: &str, state: &AppState, provider: &Provider) -> Bytes {
    let placeholder = state.pseudonym(user_id);
    let Some(at) = memchr::memmem::find(body, placeholder.as_bytes()) else { return body.clone() };
    let real = state.pseudonym_for(user_id, &provider.id);
    let mut out = body.to_vec();
    out[at..at + placeholder.len()].copy_from_slice(real.as_bytes());
    Bytes::from(out)
}

/// Sends the request and reads events up to and including the first one that carries
/// a token (or a finish reason, or usage).
async fn first_token(
    state: &AppState,
    provider: &Provider,
    endpoint: Endpoint,
    body: Bytes,
) -> Result<(SseReader, VecDeque<Bytes>), AttemptError> {
    let body = answered(state, provider, endpoint, body).await?;
    let mut reader = SseReader::new(body, StreamBounds::of(&state.config));
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

/// Sends the request and reads the whole JSON answer (at most
/// `provider_max_response_bytes`), which must be an embeddings list with a vector for
/// each input, all of one length (base64 strings or arrays of finite numbers, as
/// asked), and `usage.prompt_tokens`; anything else is the provider's failure.
async fn whole_answer(
    state: &AppState,
    provider: &Provider,
    endpoint: Endpoint,
    body: Bytes,
    inputs: u32,
    base64: bool,
) -> Result<serde_json::Value, AttemptError> {
    let mut body = answered(state, provider, endpoint, body).await?;
    let max = state.config.provider_max_response_bytes;
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| AttemptError::Retry(format!("provider's answer broke: {e}")))?;
        if buf.len() as u64 + chunk.len() as u64 > max {
            return Err(AttemptError::Retry(format!("provider's answer grew larger than {max} bytes")));
        }
        buf.extend_from_slice(&chunk);
    }
    let bad = |why: &str| AttemptError::Retry(format!("provider sent an invalid embeddings answer: {why}"));
    let mut answer: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| bad(&e.to_string()))?;
    if answer["usage"]["prompt_tokens"].as_u64().is_none() {
        return Err(bad("no usage.prompt_tokens"));
    }
    let data = answer["data"].as_array_mut().ok_or_else(|| bad("no data array"))?;
    if data.len() != inputs as usize {
        return Err(bad(&format!("{} vectors for {inputs} inputs", data.len())));
    }
    let mut seen = vec![false; data.len()];
    let mut width = None;
    for item in data.iter() {
        let index = item["index"].as_u64().and_then(|i| usize::try_from(i).ok()).filter(|&i| i < seen.len());
        if index.is_none_or(|i| std::mem::replace(&mut seen[i], true)) {
            return Err(bad("indices are not each input's once"));
        }
        let len = match (&item["embedding"], base64) {
            (serde_json::Value::String(s), true) => s.len(),
            (serde_json::Value::Array(v), false) if v.iter().all(|x| x.as_f64().is_some_and(f64::is_finite)) => v.len(),
            _ => return Err(bad("an embedding is not what encoding_format asked for")),
        };
        if len == 0 || *width.get_or_insert(len) != len {
            return Err(bad("embeddings of different lengths"));
        }
    }
    data.sort_by_key(|item| item["index"].as_u64());
    Ok(answer)
}

/// Sends the request; a provider's error status becomes the attempt's error: its
/// fault (try another) or, for a 4xx that judges the request, the client's.
async fn answered(state: &AppState, provider: &Provider, endpoint: Endpoint, body: Bytes) -> Result<ByteStream, AttemptError> {
    let (status, body) = send(state, provider, endpoint, body).await.map_err(AttemptError::Retry)?;
    if !status.is_success() {
        let text = read_error_body(body).await;
        let parsed: Option<openapi::error::ErrorBody> = serde_json::from_str(&text).ok();
        // 401, 403, 405 and 415 say the provider cannot serve our (well-formed) call, and
        // a 404 is about the model it registered: the provider's fault, counted against
        // its breaker and score like a 5xx. Other 4xx judge the request itself.
        let providers_fault = matches!(status.as_u16(), 401 | 403 | 404 | 405 | 408 | 415 | 429);
        if status.is_client_error() && !providers_fault {
            let (message, param, code) = match parsed {
                Some(b) => (b.error.message, b.error.param, b.error.code),
                None => (format!("the provider rejected the request ({status})"), None, None),
            };
            return Err(AttemptError::Rejected(ApiError::ProviderRejected { status: http::StatusCode::BAD_REQUEST, message, param, code }));
        }
        return Err(AttemptError::Retry(format!("provider answered {status}")));
    }
    Ok(body)
}

/// Sends the provider request: over the provider's link for a dial-out provider (or to
/// the replica holding it), else over HTTP to its `baseUrl` (egress rules checked at
/// every call).
async fn send(state: &AppState, provider: &Provider, endpoint: Endpoint, body: Bytes) -> Result<(http::StatusCode, ByteStream), String> {
    if provider.connection == openapi::platform::Connection::DialOut {
        return crate::inference::links::send(state, provider, endpoint.path(), body).await;
    }
    let secret = state.relay_secret(provider);
    let url = format!("{}{}", provider.base_url, endpoint.path());
    crate::inference::egress::check_connect(&url, state.config.allow_private_providers)?;
    let response = state
        .client_for(provider)
        .post(url)
        .bearer_auth(secret)
        .header("content-type", "application/json")
        .header("accept", if matches!(endpoint, Endpoint::Embeddings { .. }) { "application/json" } else { "text/event-stream" })
        .body(body)
        .send()
        .await
        .map_err(|e| format!("cannot reach provider: {}", without_url(&e)))?;
    Ok((response.status(), crate::inference::open_links::reqwest_body(response)))
}

/// A provider's error body, read up to `MAX_ERROR_BODY` bytes: it is only parsed for
/// its message, and a hostile provider could send an endless one.
async fn read_error_body(mut body: ByteStream) -> String {
    const MAX_ERROR_BODY: usize = 64 * 1024;
    let mut buf = Vec::new();
    while let Some(Ok(bytes)) = body.next().await {
        let room = MAX_ERROR_BODY - buf.len();
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if buf.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
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
